"""The sweep runner: speed and peak memory over cases into results/ (`python -m harness sweep`).

- ``cases``: case files (``cases/*.toml``) -> frozen ``SweepCase`` objects (a named ``harness.case.Case``);
- ``presets``: what a sweep without case files runs, chosen from the machine (GPU or CPU);
- ``command``: the command line: runs the plan, builds the report;
- ``plan``: what a sweep will do (also when resumed), and its ``meta.json``;
- ``runner``: runs the (case, implementation) jobs one by one, each in a child process of its own
  (``harness.isolation``: a time limit and a memory limit), and appends their rows;
- ``worker``: the child process itself; ``measure``: timing and peak memory inside it;
- ``verify``: each timed result against torch-eager's on the same inputs (a mismatch: ``wrong``);
- ``load``: the load check (the device's matmul rate at the start, between jobs and at the end);
- ``rows``: a job's outcome as rows of the results table, with the derived figures;
- ``distributed``: ``torchrun`` support (cases spread over GPUs, one run).
"""
