"""The run's report: `render` draws (grids, charts, tables; no I/O but the report folder), `build`
gathers a run's outputs from storage into `<outputs>/report/report.md`."""
