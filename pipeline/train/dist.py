"""torch.distributed set-up for Ray Train that stays on loopback when the cluster does.

Ray Train's own `TorchConfig` rendezvouses through `env://`: rank 0 creates torch's TCPStore, whose
server listens on every interface ("::" / 0.0.0.0) whatever MASTER_ADDR says, and torch offers no
option or variable to bind it elsewhere. Gloo's (and NCCL's) own sockets go to the interface the
host name resolves to, or to GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.

`torch_config()` returns a TorchConfig whose backend, when every Train worker's node address is a
loopback address (our local mode: `ray start --node-ip-address=127.0.0.1`), instead
  - binds the store's listening socket itself, on rank 0's node address (127.0.0.x or ::1), and
    hands it to `TCPStore(..., master_listen_fd=...)`;
  - points gloo and NCCL at the loopback interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, unless
    already set);
  - calls `init_process_group(backend, store=..., rank=..., world_size=...)`.
On any other cluster (a worker with a routable address) it is Ray's backend, unchanged: there the
store must listen where the other hosts can reach it.

Usage: `TorchTrainer(..., torch_config=dist.torch_config())`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch.config import TorchConfig, _TorchBackend

logger = logging.getLogger(__name__)

# Rank 0's pre-bound listening socket, between _bind_store_socket() and _init_loopback_group().
_STORE_SOCKET: socket.socket | None = None


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1, ::ffff:127.x and 'localhost'; False for routable addresses, the
    wildcard addresses and other host names."""
    host = address.strip("[]").split("%")[0]
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def loopback_interface() -> str:
    """Name of the network interface holding 127.0.0.1 ('lo' on Linux, 'lo0' on macOS)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
                return name
    except Exception:  # noqa: BLE001 - psutil missing or unusable: fall back to the usual name
        pass
    return "lo0" if os.uname().sysname == "Darwin" else "lo"


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group (store, gloo, NCCL) listens on loopback only on a loopback cluster."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config(**kwargs) -> TorchConfig:
    """The TorchConfig for TorchTrainer(torch_config=...): kwargs as for ray.train.torch.TorchConfig."""
    return LoopbackTorchConfig(**kwargs)


# ------------------------------------------------------------------------------------- on the workers


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _bind_store_socket(address: str) -> int:
    """Rank 0: a listening socket on `address`, port picked by the OS; kept until the store takes it."""
    global _STORE_SOCKET
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address.strip("[]"), 0))
    sock.listen(socket.SOMAXCONN)
    if _STORE_SOCKET is not None:
        _STORE_SOCKET.close()
    _STORE_SOCKET = sock
    return sock.getsockname()[1]


def _set_loopback_env(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address  # read by libraries that look for them (accelerate, ...)
    os.environ["MASTER_PORT"] = str(port)
    interface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)


def _init_loopback_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                         timeout_s: int) -> None:
    """init_process_group over a TCPStore whose server listens on the socket rank 0 bound."""
    global _STORE_SOCKET
    import torch
    import torch.distributed as torch_dist

    timeout = timedelta(seconds=timeout_s)
    if "nccl" in backend and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ \
            and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # as Ray's _setup_torch_process_group does
    host = address.strip("[]")
    if world_rank == 0:
        if _STORE_SOCKET is None:
            raise RuntimeError("rank 0's store socket was not bound before init_process_group")
        sock, _STORE_SOCKET = _STORE_SOCKET, None
        # The store owns (and closes) the descriptor from here on.
        store = torch_dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=sock.detach())
    else:
        store = torch_dist.TCPStore(host, port, world_size, False, timeout)
    logger.debug("process group %s rank %d/%d over loopback store %s:%d (torch %s)",
                 backend, world_rank, world_size, host, port, torch.__version__)
    torch_dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size,
                                  timeout=timeout)


# ------------------------------------------------------------------------------------ on the controller


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        import ray
        import torch.distributed as torch_dist
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars

        addresses = worker_group.execute(_node_address)
        backend = backend_config.backend
        if backend is None:
            resources = worker_group.get_resources_per_worker()
            if resources.get("TPU", 0) > 0:
                backend = "tpu_dist"
            else:
                backend = "nccl" if resources.get("GPU", 0) > 0 else "gloo"
        if not torch_dist.is_available() or not all(is_loopback(a) for a in addresses) \
                or backend in ("hccl", "tpu_dist"):
            return super().on_start(worker_group, backend_config)

        master = addresses[0]
        port = worker_group.execute_single(0, _bind_store_socket, address=master)
        worker_group.execute(_set_loopback_env, address=master, port=port)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        logger.info("torch.distributed (%s, %d workers): store on %s:%d, loopback only",
                    backend, len(worker_group), master, port)
        ray.get([
            worker_group.execute_single_async(
                rank, _init_loopback_group, backend=backend, world_rank=rank, world_size=len(worker_group),
                address=master, port=port, timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])
