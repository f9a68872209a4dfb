"""The orchestrator's parts (`orchestrator.py` is the entry point; docs/ipc.md, docs/architecture.md).

    cli.py      the command line: parser, environment defaults, argument checks, exit codes
    run.py      the conductor: `Processes` (a server + client pair, started once) and
                `Generation` (one prompt -> tokens on that pair); `Run`, the CLI's one-shot use
    outputs.py  metrics, the summary on stderr, the token / text / metrics files and generate.csv
    trace.py    the Chrome-trace JSON and the PNG timeline of --trace
"""
