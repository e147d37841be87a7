"""python -m fusion_bench.data.prepare without network: torchvision-style archives served from a file://
mirror, Hugging Face copies from local folders; the result is read by the real loaders."""

import gzip
import hashlib
import shutil
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fixtures import eight_tasks_data as fx
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from fusion_bench.data import eight_tasks_names, split_sizes
from fusion_bench.data.prepare import PrepareError, prepare, sources
from fusion_bench.data.prepare.__main__ import main
from fusion_bench.data.prepare.marker import MARKER, read_marker
from fusion_bench.data.prepare.network import OfflineError
from fusion_bench.data.tasks import load_task


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_http(tmp_path):
    """A folder served on 127.0.0.1 (no network needed): the URL prefix of its files."""
    served = tmp_path / "http"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def mirror(tmp_path, monkeypatch, local_http):
    """Tiny MNIST (.gz, from a file:// mirror), DTD (.tar.gz) and GTSRB (three .zip) archives (through
    torchvision's downloader from a local HTTP server); the source table pointed at them and the official
    sizes replaced by the tiny ones."""
    build, served = tmp_path / "build", tmp_path / "mirror"
    served.mkdir()
    http_dir, http = local_http
    n_mnist = fx.write_mnist(build / "mnist")
    mnist = []
    for raw in sorted((build / "mnist" / "MNIST" / "raw").iterdir()):
        gz = served / f"{raw.name}.gz"
        gz.write_bytes(gzip.compress(raw.read_bytes()))
        # the first mirror has no such file: the second one is used
        mnist.append(sources.Archive(((served / "missing" / gz.name).as_uri(), gz.as_uri()), _md5(gz),
                                     "mnist/MNIST/raw"))
    n_dtd = fx.write_dtd(build)
    with tarfile.open(http_dir / "dtd-r1.0.1.tar.gz", "w:gz") as tar:
        tar.add(build / "dtd" / "dtd", arcname="dtd")
    n_gtsrb = fx.write_gtsrb(build)
    zips = {"GTSRB-Training_fixed.zip": "GTSRB/Training", "GTSRB_Final_Test_Images.zip": "GTSRB/Final_Test",
            "GTSRB_Final_Test_GT.zip": "GT-final_test.csv"}
    for name, inside in zips.items():
        with zipfile.ZipFile(http_dir / name, "w") as z:
            for f in [build / "gtsrb" / inside] + sorted((build / "gtsrb" / inside).rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(build / "gtsrb").as_posix())
    table = {
        "mnist": sources.TorchvisionSource("MNIST", tuple(mnist)),
        "dtd": sources.TorchvisionSource("DTD", (sources.Archive(
            (f"{http}dtd-r1.0.1.tar.gz",), _md5(http_dir / "dtd-r1.0.1.tar.gz"), "dtd"),)),
        "gtsrb": sources.TorchvisionSource("GTSRB", tuple(
            sources.Archive((f"{http}{name}",), _md5(http_dir / name), "gtsrb") for name in zips)),
    }
    for task, src in table.items():
        monkeypatch.setitem(sources.EIGHT_TASKS, task, src)
    sizes = {"mnist": n_mnist, "dtd": n_dtd, "gtsrb": n_gtsrb}
    for task, (n_train, n_test) in sizes.items():
        monkeypatch.setitem(split_sizes.EIGHT_TASKS, task, {"train": n_train, "test": n_test})
    return sizes


def _load(make_cfg, data_root, task):
    cfg = make_cfg("taskpool=eight_tasks", f"paths.data_root={data_root}", f"taskpool.tasks=[{task}]",
                   "taskpool.num_workers=0", "taskpool.cache_eval=false")
    return load_task(cfg.taskpool, task, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, cfg.paths.data,
                     image_size=32)


def test_torchvision_archives_from_a_file_mirror_then_a_rerun_skips(mirror, make_cfg, tmp_path, monkeypatch):
    root = tmp_path / "data"
    results = prepare("eight_tasks", root, ["mnist", "dtd", "gtsrb"])
    assert {t: r.status for t, r in results.items()} == dict.fromkeys(("mnist", "dtd", "gtsrb"), "fetched")
    for task, (n_train, n_test) in mirror.items():
        assert results[task].sizes == {"train": n_train, "test": n_test}
        assert read_marker(root / task)["sizes"] == {"train": n_train, "test": n_test}
        # what the pipeline reads: the real loaders over the unpacked layout
        loaded = _load(make_cfg, root, task)
        n_val = min(int(0.1 * n_train), 5000)
        assert [len(loaded.split(s)) for s in ("train", "val", "test")] == [n_train - n_val, n_val, n_test]
    mnist = _load(make_cfg, root, "mnist")
    assert sorted(int(y) for y in mnist.split("test").labels) == sorted(np.arange(10) % 10)
    gtsrb = _load(make_cfg, root, "gtsrb")
    assert set(gtsrb.split("train").labels) | set(gtsrb.split("val").labels) == {0, 5, 42}
    # the archives are gone once the copy is verified; the unpacked files stay
    assert not list(root.rglob("*.gz")) and not list(root.rglob("*.zip"))
    assert (root / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()

    # rerun: every task is complete, nothing is fetched (not even the connectivity check)
    monkeypatch.setattr("fusion_bench.data.prepare.fetch_torchvision",
                        lambda *a: pytest.fail("fetched again"))
    monkeypatch.setattr("fusion_bench.data.prepare.check_reachable",
                        lambda todo, root, timeout: {} if not todo else pytest.fail(f"would fetch {todo}"))
    again = prepare("eight_tasks", root, ["mnist", "dtd", "gtsrb"])
    assert {r.status for r in again.values()} == {"complete"}
    assert again["mnist"].sizes == results["mnist"].sizes and again["mnist"].bytes == results["mnist"].bytes


def test_an_interrupted_download_resumes_and_a_copy_in_place_is_only_marked(mirror, tmp_path, monkeypatch):
    root = tmp_path / "data"
    # an earlier run stopped after the first MNIST file: that file is kept (its md5 is right) and not fetched
    # again, so its only mirror may be gone now
    archives = list(sources.EIGHT_TASKS["mnist"].archives)
    first = archives[0]
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(Path(first.urls[1].removeprefix("file://")), raw / first.filename)
    archives[0] = sources.Archive(((tmp_path / "gone" / first.filename).as_uri(),), first.md5, first.folder)
    monkeypatch.setitem(sources.EIGHT_TASKS, "mnist", sources.TorchvisionSource("MNIST", tuple(archives)))
    assert prepare("eight_tasks", root, ["mnist"])["mnist"].status == "fetched"
    assert (raw / "train-images-idx3-ubyte").is_file() and not (raw / first.filename).exists()

    # a complete copy without a marker (e.g. laid out by hand): counted by the loaders, marked, not downloaded
    (root / "mnist" / MARKER).unlink()
    monkeypatch.setattr("fusion_bench.data.prepare.fetch_torchvision",
                        lambda *a: pytest.fail("fetched again"))
    res = prepare("eight_tasks", root, ["mnist"])["mnist"]
    assert res.status == "verified" and read_marker(root / "mnist")["source"] == "found in place"


def test_counts_that_differ_from_the_official_sizes_are_not_marked(mirror, tmp_path, monkeypatch):
    monkeypatch.setitem(split_sizes.EIGHT_TASKS, "dtd", {"train": 13, "test": mirror["dtd"][1]})
    counted = r"the loaders count \{'train': 12, 'test': 6\}"
    with pytest.raises(PrepareError, match=rf"dtd: .*{counted}.*official") as e:
        prepare("eight_tasks", tmp_path / "data", ["dtd"])
    assert e.value.results["dtd"].status == "failed"
    assert read_marker(tmp_path / "data" / "dtd") is None


def test_no_network_stops_before_downloading_and_names_the_hosts(tmp_path, monkeypatch):
    dead = "http://127.0.0.1:9/"  # the discard port: connection refused at once
    monkeypatch.setitem(sources.EIGHT_TASKS, "mnist", sources.TorchvisionSource("MNIST", (
        sources.Archive((f"{dead}train-images-idx3-ubyte.gz",), "0" * 32, "mnist/MNIST/raw"),)))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    root = tmp_path / "data"
    with pytest.raises(OfflineError) as e:
        prepare("eight_tasks", root, ["mnist", "sun397"], timeout=2)
    msg = str(e.value)
    assert "nothing was downloaded" in msg
    assert "mnist: could not reach http://127.0.0.1:9/" in msg
    assert "sun397: could not reach http://127.0.0.1:9/" in msg
    assert f"mnist: torchvision MNIST: {root}/mnist/MNIST/raw/" in msg  # how to lay it out by hand
    assert f"Hugging Face datasets copy in {root}/sun397/" in msg
    assert not root.exists()
    # GLUE too, and the command line exits with 2
    assert main(["glue", "--root", str(root), "--tasks", "rte", "--timeout", "2"]) == 2
    assert not root.exists()


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'eight'"):
        prepare("eight", tmp_path)
    with pytest.raises(ValueError, match=r"unknown eight_tasks task\(s\) \['imagenet'\]"):
        prepare("eight_tasks", tmp_path, ["mnist", "imagenet"])
    with pytest.raises(SystemExit):
        main(["eight_tasks", "--root", str(tmp_path), "--hf", "sun397"])  # not TASK=SOURCE


def test_the_archive_table_matches_torchvision():
    from torchvision.datasets import DTD, MNIST, SVHN

    mnist = sources.EIGHT_TASKS["mnist"].archives
    assert [(a.filename, a.md5) for a in mnist] == list(MNIST.resources)
    assert all(a.urls == tuple(m + a.filename for m in MNIST.mirrors) for a in mnist)
    svhn = sources.EIGHT_TASKS["svhn"].archives
    assert [(a.urls[0], a.filename, a.md5) for a in svhn] == [tuple(SVHN.split_list[s])
                                                              for s in ("train", "test")]
    (dtd,) = sources.EIGHT_TASKS["dtd"].archives
    assert (dtd.urls[0], dtd.md5) == (DTD._URL, DTD._MD5)


# ---- Hugging Face copies -------------------------------------------------------------------------------
def _images(n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def hf_sources(tmp_path, monkeypatch):
    """sun397 as a save_to_disk folder (ClassLabel names in another order than ours), cars as Hub-style
    parquet files, GLUE MNLI as a save_to_disk folder with the Hub's columns and split names."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "hf_src"
    sun_names = list(reversed(eight_tasks_names.SUN397_CLASSES))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=sun_names)})
    sun = datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"image": _images(n, i), "label": [0, 1, 396] * (n // 3)},
                                      features=feats)
        for i, (s, n) in enumerate((("train", 6), ("test", 3)))})
    sun.save_to_disk(str(src / "sun397"))
    cars_feats = datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=list(eight_tasks_names.CARS_CLASSES))})
    (src / "cars" / "data").mkdir(parents=True)
    for split, n in (("train", 8), ("test", 4)):
        ds = datasets.Dataset.from_dict({"image": _images(n, 7), "label": [0, 195] * (n // 2)},
                                        features=cars_feats)
        ds.to_parquet(str(src / "cars" / "data" / f"{split}-00000-of-00001.parquet"))
    nli = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                             "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                             "idx": datasets.Value("int32")})
    rows = {"premise": [f"p{i}" for i in range(20)], "hypothesis": [f"h{i}" for i in range(20)],
            "label": [i % 3 for i in range(20)], "idx": list(range(20))}
    dev = datasets.Dataset.from_dict({k: v[:5] for k, v in rows.items()}, features=nli)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=nli), "validation_matched": dev}
                         ).save_to_disk(str(src / "mnli"))
    monkeypatch.setitem(split_sizes.EIGHT_TASKS, "sun397", {"train": 6, "test": 3})
    monkeypatch.setitem(split_sizes.EIGHT_TASKS, "cars", {"train": 8, "test": 4})
    monkeypatch.setitem(split_sizes.GLUE, "mnli", {"train": 20, "dev": 5})
    return src


def test_hugging_face_copies_from_local_folders(hf_sources, make_cfg, tmp_path, monkeypatch):
    root = tmp_path / "data"
    hf = {"sun397": str(hf_sources / "sun397"), "cars": str(hf_sources / "cars")}
    res = prepare("eight_tasks", root, ["sun397", "cars"], hf=hf, cache_dir=str(tmp_path / "hf_cache"))
    assert {t: (r.status, r.sizes) for t, r in res.items()} == {
        "sun397": ("fetched", {"train": 6, "test": 3}), "cars": ("fetched", {"train": 8, "test": 4})}
    assert res["sun397"].source == f"local copy {hf_sources / 'sun397'}"
    assert not (root / ".prepare-tmp").exists()  # the staging folder is renamed into place and removed
    sun = _load(make_cfg, root, "sun397")
    # reversed ClassLabel names: 0 is 'youth hostel' (ours 396), 396 is 'abbey' (ours 0)
    assert sorted(set(sun.split("test").labels)) == [0, 395, 396]
    x, y = sun.split("test")[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    cars = _load(make_cfg, root, "cars")
    assert set(cars.split("test").labels) == {0, 195}
    assert len(cars.split("train")) + len(cars.split("val")) == 8

    from fusion_bench.data.glue import read_split

    glue = prepare("glue", root, ["mnli"], hf={"mnli": str(hf_sources / "mnli")})
    assert glue["mnli"].status == "fetched" and (root / "glue" / "MNLI" / "dataset_dict.json").is_file()
    dev = read_split("mnli", root, "dev")
    assert len(dev) == 5 and dev[1].target == "neutral" and dev[0].source == "mnli hypothesis: h0 premise: p0"

    # rerun: complete; a task folder holding something else is never overwritten
    again = prepare("eight_tasks", root, ["sun397", "cars"], hf=hf)
    assert {r.status for r in again.values()} == {"complete"}
    (root / "resisc45").mkdir()
    (root / "resisc45" / "notes.txt").write_text("mine")
    monkeypatch.setitem(split_sizes.EIGHT_TASKS, "resisc45", {"train": 6, "test": 3})
    with pytest.raises(PrepareError, match=r"resisc45: .*already holds files"):
        prepare("eight_tasks", root, ["resisc45"], hf={"resisc45": str(hf_sources / "sun397")})
    assert (root / "resisc45" / "notes.txt").read_text() == "mine"
