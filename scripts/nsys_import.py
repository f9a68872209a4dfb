"""Make sure an `nsys profile -o PREFIX` run left PREFIX.nsys-rep (run_ipc.sh --nsys calls this).

    python scripts/nsys_import.py NSYS PREFIX

nsys writes the raw capture PREFIX.qdstrm, then imports it into PREFIX.nsys-rep with QdstrmImporter,
which lives in a host folder beside the nsys binary's target folder (target-linux-x64/nsys,
host-linux-x64/ or linux-desktop-glibc_*-x64/QdstrmImporter). A stripped install (the Nsight Compute
copy of nsys on CUDA images) cannot find it, or it cannot start for want of elfutils' libdw.so.1 /
libelf.so.1: nsys then stops at the .qdstrm. Here the importer is found and run, with the folder named
by CASE4_NSYS_LIBS on LD_LIBRARY_PATH; where it cannot start, one line names what is missing.
Exit 0: the report exists; 1: it could not be made (the .qdstrm is kept).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

IMPORTER = "QdstrmImporter"


def find_importer(nsys: str) -> Path | None:
    """QdstrmImporter next to `nsys` or in a sibling folder of its folder (the install layouts)."""
    d = Path(nsys).resolve().parent
    for c in [d / IMPORTER, *sorted(d.parent.glob(f"*/{IMPORTER}"))]:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def importer_env(env=None) -> dict:
    env = dict(os.environ if env is None else env)
    extra = env.get("CASE4_NSYS_LIBS", "").strip()
    if extra:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (extra, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def missing_libraries(text: str) -> list[str]:
    """Shared libraries a loader could not find, from `ldd` output or a loader error message."""
    found = re.findall(r"^\s*(\S+) => not found", text, re.M)
    found += re.findall(r"error while loading shared libraries: (\S+?): cannot open shared object file", text)
    return list(dict.fromkeys(found))


def import_report(nsys: str, prefix: str, env=None, run=subprocess.run) -> tuple[bool, str]:
    """(report exists now, the one line to print)."""
    rep, raw = Path(prefix + ".nsys-rep"), Path(prefix + ".qdstrm")
    if rep.exists():
        return True, f"nsys report: {rep}"
    if not raw.exists():
        return False, f"--nsys: nsys wrote neither {rep.name} nor {raw.name} in {rep.parent} (see its messages above)"
    importer = find_importer(nsys)
    if importer is None:
        return False, (f"--nsys: no {IMPORTER} beside {nsys} (a full Nsight Systems install has it in host-linux-x64/); "
                       f"the raw capture is kept: {raw}")
    env = importer_env(env)
    hint = ("elfutils' libdw.so.1 and libelf.so.1: install them (apt-get install libdw1 libelf1) or copy them into "
            "a folder and set CASE4_NSYS_LIBS to it")
    try:
        ldd = run(["ldd", str(importer)], capture_output=True, text=True, env=env)
        missing = missing_libraries(ldd.stdout + ldd.stderr)
    except FileNotFoundError:  # no ldd: the importer's own error says it
        missing = []
    if missing:
        return False, (f"--nsys: {IMPORTER} cannot start, missing {', '.join(missing)} ({hint}); "
                       f"the raw capture is kept: {raw}")
    r = run([str(importer), "-i", str(raw)], capture_output=True, text=True, env=env)
    if r.returncode == 0 and rep.exists():
        raw.unlink()  # the report holds everything the raw capture did, and the raw one is large
        return True, f"nsys report: {rep}"
    out = r.stdout + r.stderr
    missing = missing_libraries(out)
    if missing:
        why = f"missing {', '.join(missing)} ({hint})"
    else:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        why = f"exit code {r.returncode}: {lines[-1] if lines else 'no output'}"
    return False, f"--nsys: {IMPORTER} failed, {why}; the raw capture is kept: {raw}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python scripts/nsys_import.py NSYS PREFIX", file=sys.stderr)
        return 2
    ok, line = import_report(*argv)
    print(f"[case4] {line}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
