"""The cpu profile end to end as an outside user gets it: a clone with no ../shared beside it, torchgeo's UCMerced
"downloaded". Run by hand (not `make bench`, not CI: the whole cpu profile takes about 50 minutes).

What it does, all under ``--work`` (never inside this repository):

1. ``server/``: a stand-in for torchgeo's UCMerced server in its layout (``UCMerced_LandUse.zip`` holding
   ``UCMerced_LandUse/Images/<class>/<class>NN.tif`` and ``uc_merced-{train,val,test}.txt``) at UCMerced's real size:
   21 classes x 100 TIFFs of 256 px, split 60/20/20. The pixels come from ``--images`` (a folder of class folders,
   e.g. AID; its first 21 classes stand in for UCMerced's, so the accuracies are NOT UCMerced's: this checks the
   path, not the numbers);
2. ``clone/main``: ``git clone`` of this repository's HEAD, then ``make setup`` there (its own venv);
3. ``make reproduce REAL=1`` in the clone with a ``sitecustomize`` on ``PYTHONPATH`` that, in every process the
   run starts, makes vitadapt's reachability probe succeed and torchgeo's ``download_url`` copy from ``server/``
   (each request logged to ``asked.log``);
4. prints the runner's summary, the downloads asked for and each notebook's ``sources.fallback`` record::

    .venv/bin/python benchmarks/fallback_run.py --images ../shared/data/aid --work /tmp/vitadapt-fallback
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UCMERCED = ("agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential",
            "forest", "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark",
            "overpass", "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt")
PER_CLASS, SPLIT = 100, (("train", 60), ("val", 20), ("test", 20))
SITE = '''"""Fakes torchgeo's UCMerced download for every process of a run (benchmarks/fallback_run.py)."""
import os
if os.environ.get("FAKE_UCMERCED_SERVER"):
    import shutil
    from pathlib import Path
    import torchgeo.datasets.ucmerced as tgu
    import vitadapt.data.fetch as fetch
    server = Path(os.environ["FAKE_UCMERCED_SERVER"])

    def fake_download(url, root, filename=None, md5=None, **_):
        with open(server.parent / "asked.log", "a") as log:
            log.write(f"{os.getpid()} {url} -> {root}\\n")
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(server / url.rsplit("/", 1)[1], root)
    tgu.download_url = fake_download
    fetch.reachable = lambda url, timeout=10.0: None
'''


def build_server(images: Path, out: Path) -> dict[str, int]:
    """The stand-in server of step 1; returns the split sizes."""
    from PIL import Image
    sources = sorted(p for p in images.iterdir() if p.is_dir())
    if len(sources) < len(UCMERCED):
        raise ValueError(f"--images {images}: {len(sources)} class folders; valid: a folder with at least "
                         f"{len(UCMERCED)} class folders of images")
    out.mkdir(parents=True, exist_ok=True)
    names = {s: [] for s, _ in SPLIT}
    bounds = [(s, sum(n for _, n in SPLIT[:i + 1])) for i, (s, _) in enumerate(SPLIT)]   # (split, end index)
    with zipfile.ZipFile(out / "UCMerced_LandUse.zip", "w") as z:
        for cls, src in zip(UCMERCED, sources):
            files = sorted(f for f in src.iterdir() if f.is_file())[:PER_CLASS]
            if len(files) < PER_CLASS:
                raise ValueError(f"--images: {src} holds {len(files)} images; valid: at least {PER_CLASS} per class")
            for i, f in enumerate(files):
                buf = io.BytesIO()
                Image.open(f).convert("RGB").resize((256, 256), Image.BILINEAR).save(buf, format="TIFF")
                z.writestr(f"UCMerced_LandUse/Images/{cls}/{cls}{i:02d}.tif", buf.getvalue())
                names[next(s for s, end in bounds if i < end)].append(f"{cls}{i:02d}.tif")
    for s, files in names.items():
        (out / f"uc_merced-{s}.txt").write_text("\n".join(files) + "\n")
    return {s: len(v) for s, v in names.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "aid")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vitadapt-fallback"))
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--nb", default="", help="only these notebooks (make reproduce NB=...)")
    a = ap.parse_args(argv)
    work = a.work.resolve()
    if not a.images.is_dir():
        raise ValueError(f"--images {a.images} is not a folder; valid: a folder of class folders (e.g. AID)")
    if REPO in (work, *work.parents):
        raise ValueError(f"--work {work} is inside the repository; valid: a folder outside {REPO}")
    if work.exists():
        shutil.rmtree(work)
    print("server:", build_server(a.images, work / "server"), flush=True)
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(SITE)
    clone = work / "clone" / "main"                      # ../shared does not exist beside it
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["make", "setup"], cwd=clone, check=True, stdout=subprocess.DEVNULL)
    env = {**os.environ, "FAKE_UCMERCED_SERVER": str(work / "server"), "PYTHONPATH": str(work / "site")}
    for var in ("VITADAPT_OFFLINE", "VITADAPT_CACHE", "VITADAPT_AID_ROOT", "VITADAPT_UCMERCED_ROOT"):
        env.pop(var, None)
    cmd = ["make", "reproduce", "REAL=1", f"PROFILE={a.profile}"] + ([f"NB={a.nb}"] if a.nb else [])
    rc = subprocess.run(cmd, cwd=clone, env=env).returncode
    asked = (work / "asked.log").read_text().splitlines() if (work / "asked.log").exists() else []
    print(f"make reproduce: rc {rc}; downloads asked for: {len(asked)}")
    print("\n".join(f"  {line.split()[1].rsplit('/', 1)[1]}" for line in asked))
    for m in sorted((clone / "outputs" / a.profile).glob("*/metrics.json")):
        fb = json.loads(m.read_text()).get("run", {}).get("sources", {}).get("fallback") or {}
        print(f"  {m.parent.name}: data used {fb.get('dataset_used')}, overrides {fb.get('overrides')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
