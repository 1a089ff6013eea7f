"""``python -m harness env ...``: create, pack, install and check per-framework environments.

Each toolkit runs in an overlay of packages installed with ``pip --target`` and put first on ``PYTHONPATH`` over
the base interpreter (see :mod:`harness.running.envs`). The package lists live in ``harness/running/environments.yaml``.

Decision: overlays are installed with ``--no-deps`` from an explicit, complete, pinned list. Installing with
dependencies and deleting torch/nvidia-*/triton afterwards would download gigabytes of CUDA wheels, and would
give a different set on every day the registry changes; a pinned list is reproducible and is exactly what the
offline bundle for the GPU box carries.

Examples::

    python -m harness env list                         # environments, installed or not, and their adapters
    python -m harness env create trl                   # .envs/trl/site from PyPI (this machine's Python)
    python -m harness env check trl                    # do its imports work? which versions load?
    python -m harness env pack unsloth                 # .bundles/unsloth.tar.xz for the GPU box (py3.12, x86-64)
    python -m harness env pack all                     # every environment, one bundle each
    python -m harness env install .bundles/unsloth.tar.xz   # offline, on the GPU box
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

from harness.common.names import unknown
from harness.common.paths import REPO_ROOT
from harness.running import envs
from harness.running.envs import worker_environment
from harness.storing.results import read_json

CONFIG_PATH = REPO_ROOT / "harness" / "running" / "environments.yaml"
BUNDLE_FORMAT = 1
DEFAULT_PLATFORMS = ["manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64",
                     "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                     "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                     "manylinux_2_5_x86_64", "manylinux1_x86_64"]


def load_config(path: Path = CONFIG_PATH) -> dict[str, dict[str, Any]]:
    """The environments file as ``{name: {adapters, packages, imports, prune, env_vars}}``."""
    data = yaml.safe_load(path.read_text()) or {}
    for name, spec in data.items():
        spec.setdefault("adapters", [])
        spec.setdefault("packages", [])
        spec.setdefault("imports", [])
        spec.setdefault("prune", {})
        spec.setdefault("env_vars", {})
        bad = [p for p in spec["packages"] if "==" not in p]
        if bad:
            raise ValueError(f"{path}: {name}: packages must be pinned with ==, not {bad}")
    return data


class EnvInputError(ValueError):
    """A bad name, bundle or manifest given to an ``env`` command (exit 2, the message says why)."""


ENV_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")  # an environment is a folder of .envs/: one safe path component


def _env_spec(name: str) -> dict[str, Any]:
    cfg = load_config()
    if name not in cfg:
        raise EnvInputError(unknown("environment", name, cfg))
    return cfg[name]


def _env_name(name: Any, where: str) -> str:
    """``name`` as the folder of an environment under .envs/, or :class:`EnvInputError` (a path, '..', not text)."""
    if not isinstance(name, str) or not ENV_NAME.match(name) or not name.strip("."):
        raise EnvInputError(f"{where}: {name!r} is not an environment name (letters, digits, _ . -; one folder "
                            "name under .envs/)")
    return name


def _dist_name(req: str) -> str:
    return req.split("==")[0].strip().lower().replace("_", "-")


def _write_env_json(name: str, packages: list[str], env_vars: dict[str, str], source: str,
                    python_version: str | None = None) -> Path:
    meta = {"name": name, "python": sys.executable,
            "python_version": python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "packages": packages, "env_vars": env_vars,
            "source": source}
    p = envs.envs_root() / name / "env.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, p)
    return p


def _install_into(name: str, pip_args: list[str]) -> Path:
    """``pip install --no-deps --target`` into a fresh directory, then swap it in (never half an overlay)."""
    root = envs.envs_root() / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="site.tmp-", dir=root))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--target", str(staging)] + pip_args
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise SystemExit(f"pip failed (exit {proc.returncode}); {name} left as it was")
    shutil.rmtree(staging / "bin", ignore_errors=True)  # console scripts point at this machine: call `python -m`
    site = root / "site"
    (envs.envs_root() / name / "env.json").unlink(missing_ok=True)
    if site.exists():
        shutil.rmtree(site)
    staging.rename(site)
    return site


# ----------------------------------------------------------------------------------------------------------------
# create


def cmd_create(args) -> int:
    spec = _env_spec(args.name)
    # local_extra: what the GPU box's interpreter has (so bundles leave it out) but a development machine may lack
    _install_into(args.name, list(spec["packages"]) + list(spec.get("local_extra", [])))
    p = _write_env_json(args.name, spec["packages"], spec["env_vars"], source="create")
    print(f"created {envs.site_dir(args.name)} ({_size_mb(envs.site_dir(args.name)):.0f} MB); {p}")
    return cmd_check(argparse.Namespace(names=[args.name]))


# ----------------------------------------------------------------------------------------------------------------
# pack / install


def download_wheels(packages: list[str], dest: Path, python_version: str, platforms: list[str],
                    cache: Path | None = None) -> list[Path]:
    """One wheel per pinned package for the target interpreter/platform (sdist-only ones built here).

    Args:
        packages: ``name==version`` strings.
        dest: directory to put the wheels in.
        python_version: target Python, e.g. ``"3.12"``.
        platforms: pip ``--platform`` tags accepted on the target.
        cache: directory reused between calls (downloads are kept there).

    Returns:
        The wheel paths, one per package, in the order given.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cache = cache or dest
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for req in packages:
        name, version = req.split("==")
        stem = name.lower().replace("-", "_")
        have = [w for w in cache.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}-")
                and _wheel_fits(w.name, python_version)]
        if not have:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
                   *sum((["--platform", p] for p in platforms), []), "-d", str(cache), req]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # sdist only (antlr4-python3-runtime, langdetect, ...): build a wheel here
                with tempfile.TemporaryDirectory() as td:
                    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                           "-w", td, req]
                    proc2 = subprocess.run(cmd, capture_output=True, text=True)
                    built = list(Path(td).glob("*.whl"))
                    if proc2.returncode != 0 or not built:
                        raise SystemExit(f"cannot get a wheel for {req}:\n{proc.stderr[-1500:]}\n"
                                         f"{proc2.stderr[-1500:]}")
                    if not built[0].name.endswith("-none-any.whl"):
                        raise SystemExit(f"{req} has no wheel for the target and builds a platform wheel here "
                                         f"({built[0].name}): it cannot travel")
                    shutil.copy(built[0], cache / built[0].name)
            have = [w for w in cache.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}-")
                    and _wheel_fits(w.name, python_version)]
        if not have:
            raise SystemExit(f"downloaded {req} but found no wheel named {stem}-{version}-*.whl in {cache}")
        if cache != dest:
            shutil.copy(have[0], dest / have[0].name)
        out.append(dest / have[0].name)
    return out


def _wheel_fits(filename: str, python_version: str) -> bool:
    """Whether a wheel file name suits CPython ``python_version`` on Linux x86-64."""
    py, abi, plat = filename[:-4].split("-")[-3:]
    major, minor = python_version.split(".")[:2]
    if not (plat == "any" or "x86_64" in plat):
        return False
    for t in py.split("."):
        if t in (f"cp{major}{minor}", f"py{major}{minor}", f"py{major}"):
            return True
        if abi == "abi3" and t.startswith(f"cp{major}") and int(t[3:] or 0) <= int(minor):
            return True
    return False


def prune_and_store(wheel: Path, patterns: list[str]) -> tuple[int, int]:
    """Rewrite ``wheel`` without files matching ``patterns`` (``!pattern`` keeps), members stored uncompressed.

    Storing the members uncompressed matters: deflated wheels inside a tar.xz barely shrink, stored ones
    compress about 2-4x better. Pruned files are also removed from the wheel's RECORD.

    Returns:
        (files dropped, bytes dropped, uncompressed).
    """
    dropped, dropped_bytes = 0, 0
    drop = [p for p in patterns if not p.startswith("!")]
    keep = [p[1:] for p in patterns if p.startswith("!")]
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zout:
        keep_names = set()
        for info in zin.infolist():
            if any(fnmatch.fnmatch(info.filename, pat) for pat in drop) and not any(
                    fnmatch.fnmatch(info.filename, pat) for pat in keep):
                dropped += 1
                dropped_bytes += info.file_size
                continue
            keep_names.add(info.filename)
        for info in zin.infolist():
            if info.filename not in keep_names:
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD") and dropped:
                lines = [ln for ln in data.decode().splitlines() if ln.split(",")[0] in keep_names
                         or ln.split(",")[0].endswith("RECORD")]
                data = ("\n".join(lines) + "\n").encode()
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.external_attr = info.external_attr
            zout.writestr(zi, data, compress_type=zipfile.ZIP_STORED)
    os.replace(tmp, wheel)
    return dropped, dropped_bytes


def cmd_pack(args) -> int:
    names = list(load_config()) if args.name == "all" else [args.name]
    rc = 0
    for name in names:
        rc |= _pack_one(name, args)
    return rc


def _pack_one(name: str, args) -> int:
    spec = _env_spec(name)
    out = Path(args.out) if args.out and args.name != "all" else REPO_ROOT / ".bundles" / f"{name}.tar.xz"
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = REPO_ROOT / ".bundles" / "cache"
    platforms = args.platform or DEFAULT_PLATFORMS
    with tempfile.TemporaryDirectory() as td:
        wdir = Path(td) / "wheels"
        wheels = download_wheels(spec["packages"], wdir, args.python_version, platforms, cache)
        entries = []
        for req, w in zip(spec["packages"], wheels, strict=True):
            before = w.stat().st_size
            pats = spec["prune"].get(_dist_name(req).replace("-", "_"), []) + spec["prune"].get(_dist_name(req), [])
            n_drop, b_drop = prune_and_store(w, pats)
            entries.append({"requirement": req, "wheel": w.name, "wheel_bytes_downloaded": before,
                            "pruned_files": n_drop, "pruned_bytes": b_drop})
        manifest = {"format": BUNDLE_FORMAT, "env": name, "packages": spec["packages"],
                    "env_vars": spec["env_vars"], "imports": spec["imports"], "python_version": args.python_version,
                    "platforms": platforms, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wheels": entries,
                    "install": f"python3 -m harness env install {out.name}"}
        tmp_out = out.with_suffix(".tmp")
        with tarfile.open(tmp_out, "w:xz", preset=9) as tar:
            data = json.dumps(manifest, indent=1).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
            for w in sorted(wdir.glob("*.whl")):
                tar.add(w, arcname=f"wheels/{w.name}")
        os.replace(tmp_out, out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {len(wheels)} wheels "
          f"(install: python3 -m harness env install {out})")
    return 0


def cmd_install(args) -> int:
    bundle = Path(args.bundle)
    if args.name is not None:
        _env_name(args.name, "--name")
    if not bundle.is_file():
        raise EnvInputError(f"{bundle}: " + ("not a bundle file (a directory)" if bundle.is_dir() else
                                             "no such bundle file" if not bundle.exists() else "not a regular file"))
    with tempfile.TemporaryDirectory() as td:
        try:
            with tarfile.open(bundle) as tar:
                tar.extractall(td, filter="data")  # members leaving the folder or links out of it: refused
        except (tarfile.TarError, OSError, EOFError) as e:
            raise EnvInputError(f"{bundle}: not a bundle of `python -m harness env pack` ({e})") from None
        manifest = read_json(Path(td) / "manifest.json")
        if manifest is None or not isinstance(manifest.get("packages", []), list) \
                or not isinstance(manifest.get("env_vars", {}), dict):
            raise EnvInputError(f"{bundle}: no readable manifest.json of `python -m harness env pack` in it")
        name = _env_name(args.name or manifest.get("env"), "--name" if args.name else f"{bundle}: manifest env")
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if manifest.get("python_version") not in (None, here) and not args.force:
            print(f"{bundle} was packed for Python {manifest['python_version']}, this is {here}: its compiled "
                  f"wheels would not load (use --force to install anyway)", file=sys.stderr)
            return 2
        wheels = sorted(str(p) for p in (Path(td) / "wheels").glob("*.whl"))
        if not wheels:
            raise EnvInputError(f"{bundle}: holds no wheels/*.whl")
        _install_into(name, ["--no-index", *wheels])
        _write_env_json(name, manifest.get("packages", []), manifest.get("env_vars", {}),
                        source=f"bundle {bundle.name}", python_version=here)
    print(f"installed {bundle} into {envs.site_dir(name)} ({_size_mb(envs.site_dir(name)):.0f} MB)")
    return cmd_check(argparse.Namespace(names=[name]))


# ----------------------------------------------------------------------------------------------------------------
# list / check


def _size_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20 if p.exists() else 0.0


_CHECK_SNIPPET = r"""
import importlib, importlib.metadata as md, json, sys
res = {"imports": {}, "versions": {}}
for mod in sys.argv[1].split(","):
    if not mod:
        continue
    try:
        m = importlib.import_module(mod)
        res["imports"][mod] = {"ok": True, "file": getattr(m, "__file__", None)}
    except BaseException as e:
        res["imports"][mod] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
for dist in sys.argv[2].split(","):
    if not dist:
        continue
    try:
        res["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        res["versions"][dist] = None
for dist in ("torch", "transformers", "peft", "accelerate"):
    try:
        res["versions"].setdefault(dist, md.version(dist))
    except md.PackageNotFoundError:
        pass
print("TUNEBENCH_CHECK " + json.dumps(res))
"""


def check_env(name: str, timeout_s: float = 300) -> dict[str, Any]:
    """Import the environment's modules in a subprocess with the worker's PYTHONPATH; versions that load.

    Returns:
        ``{"ready": bool, "reason": str | None, "imports": {...}, "versions": {...}, "mismatched": [...]}``
        where ``mismatched`` lists pinned packages whose loaded version differs from the pin (e.g. the base
        interpreter's copy shadows a missing overlay package).
    """
    spec = _env_spec(name)
    env = envs.resolve(name)
    out: dict[str, Any] = {"ready": env.ready, "reason": env.reason, "imports": {}, "versions": {}, "mismatched": []}
    if not env.ready:
        return out
    dists = [_dist_name(p) for p in spec["packages"]]
    with tempfile.TemporaryDirectory() as td:  # cwd outside the repo, as for workers
        proc = subprocess.run([env.python, "-c", _CHECK_SNIPPET, ",".join(spec["imports"]), ",".join(dists)],
                              env=worker_environment(env), cwd=td, capture_output=True, text=True, timeout=timeout_s)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TUNEBENCH_CHECK ")), None)
    if line is None:
        out["ready"] = False
        out["reason"] = f"check process failed (exit {proc.returncode}): {proc.stderr[-1500:]}"
        return out
    res = json.loads(line.split(" ", 1)[1])
    out.update(res)
    for req in spec["packages"]:
        want = req.split("==")[1]
        got = res["versions"].get(_dist_name(req))
        if got != want:
            out["mismatched"].append(f"{_dist_name(req)}: pinned {want}, loads {got}")
    bad = [f"{m}: {r['error']}" for m, r in res["imports"].items() if not r["ok"]]
    if bad:
        out["ready"] = False
        out["reason"] = "; ".join(bad)
    return out


def cmd_check(args) -> int:
    cfg = load_config()
    names = args.names or [n for n in cfg if envs.read_meta(n) is not None]
    if not names:
        print("no environment installed; `python -m harness env list` shows what can be created")
        return 0
    rc = 0
    for name in names:
        res = check_env(name)
        state = "ok" if res["ready"] else "NOT READY"
        print(f"{name}: {state} (adapters: {', '.join(cfg[name]['adapters'])})")
        if res["reason"]:
            print(f"  {res['reason']}")
        for mod, r in res["imports"].items():
            print(f"  import {mod}: {'ok' if r['ok'] else r['error']}")
        shown = {k: v for k, v in res["versions"].items() if v}
        if shown:
            print("  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(shown.items())))
        for m in res["mismatched"]:
            print(f"  version mismatch: {m}")
        rc |= 0 if res["ready"] else 1
    return rc


def cmd_list(args) -> int:
    cfg = load_config()
    for name, spec in cfg.items():
        meta = envs.read_meta(name)
        if meta is None:
            state = "not installed"
        else:
            state = (f"installed {meta.get('created', '?')} ({meta.get('source', '?')}, Python "
                     f"{meta.get('python_version', '?')}, {_size_mb(envs.site_dir(name)):.0f} MB)")
        bundle = REPO_ROOT / ".bundles" / f"{name}.tar.xz"
        btxt = ""
        if bundle.exists():
            btxt = f"; bundle {bundle.relative_to(REPO_ROOT)} {bundle.stat().st_size / 2**20:.1f} MiB"
        print(f"{name:13s} {state}{btxt}")
        print(f"{'':13s} adapters: {', '.join(spec['adapters'])}; {len(spec['packages'])} packages: "
              f"{', '.join(spec['packages'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness env", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="environments from harness/running/environments.yaml and whether they are installed")
    c = sub.add_parser("check", help="import each environment's modules in a subprocess; report versions")
    c.add_argument("names", nargs="*", help="environments (default: every installed one)")
    cr = sub.add_parser("create", help="pip install --no-deps --target .envs/NAME/site (needs the registry)")
    cr.add_argument("name")
    pk = sub.add_parser("pack", help="offline bundle of an environment's wheels for another machine")
    pk.add_argument("name", help="environment, or `all`")
    pk.add_argument("--out", help="bundle path (default .bundles/NAME.tar.xz)")
    pk.add_argument("--python-version", default="3.12", help="target interpreter (default 3.12: the GPU box)")
    pk.add_argument("--platform", action="append", help="pip platform tag (repeatable; default manylinux x86-64)")
    ins = sub.add_parser("install", help="install a bundle with no network: pip --no-index --no-deps --target")
    ins.add_argument("bundle")
    ins.add_argument("--name", help="environment name (default: the one in the bundle)")
    ins.add_argument("--force", action="store_true", help="install even if packed for another Python")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m harness env``; returns the exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"list": cmd_list, "check": cmd_check, "create": cmd_create, "pack": cmd_pack,
                "install": cmd_install}[args.cmd](args)
    except EnvInputError as e:
        print(f"env {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
