"""The sweep runner: speed and peak memory over cases into results/ (`python -m harness sweep`).

- ``cases``: case files (``cases/*.toml``) -> frozen ``Case`` objects;
- ``presets``: what a sweep without case files runs, chosen from the machine (GPU or CPU);
- ``command``: the command line; plans the jobs, writes ``meta.json``, builds the report;
- ``runner``: runs the (case, implementation) jobs one by one, each in a child process of its own
  (``harness.isolation``: a time limit and a memory limit), and appends their rows;
- ``worker``: the child process itself; ``measure``: timing and peak memory inside it;
- ``rows``: a job's outcome as rows of the results table, with the derived figures;
- ``environment``: what ``meta.json`` records about the machine and the software;
- ``distributed``: ``torchrun`` support (cases spread over GPUs, one run).
"""
