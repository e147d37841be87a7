"""taskpool=eight_tasks: each loader reads a tiny fixture written in its real on-disk format."""

import pickle
import re
import sys

import numpy as np
import pytest
import torch
from fixtures import eight_tasks_data as fx
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader

from fusion_bench.data import eight_tasks
from fusion_bench.data.eight_tasks import DatasetNotFoundError, carve_val, find_layout
from fusion_bench.data.tasks import known_tasks, load_task

MEAN, STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
NUM_CLASSES = {"sun397": 397, "cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10,
               "dtd": 47}


def _write(name, data_root):
    """Write task `name` in its native layout; returns (official train size, test size, labels expected)."""
    if name == "mnist":
        return (*fx.write_mnist(data_root / "mnist"), set(range(10)))
    if name == "svhn":
        return (*fx.write_svhn(data_root / "svhn"), set(range(10)))
    if name == "gtsrb":
        return (*fx.write_gtsrb(data_root), {0, 5, 42})
    if name == "dtd":
        return (*fx.write_dtd(data_root), {0, 30, 46})  # banded, polka-dotted, zigzagged
    if name == "eurosat":
        return (*fx.write_eurosat(data_root), {0, 1, 9})  # AnnualCrop, Forest, SeaLake
    if name == "cars":
        return (*fx.write_cars(data_root / "cars"), {0, 1, 195})
    if name == "sun397":
        return (*fx.write_sun397(data_root / "sun397"), {0, 8, 396})  # abbey, apartment building outdoor, youth hostel
    if name == "resisc45":
        return (*fx.write_resisc45(data_root / "resisc45"), {0, 35, 44})  # airplane, sea ice, wetland
    raise KeyError(name)


@pytest.fixture
def pool(make_cfg, tmp_path):
    def _pool(*tasks):
        cfg = make_cfg("taskpool=eight_tasks", f"paths.data_root={tmp_path / 'data_root'}",
                       f"taskpool.tasks=[{','.join(tasks)}]", "taskpool.num_workers=0")
        return cfg

    return _pool


@pytest.mark.parametrize("name", list(NUM_CLASSES))
def test_loader_reads_native_layout(name, pool, tmp_path):
    cfg = pool(name)
    data_root = tmp_path / "data_root"
    n_train, n_test, labels = _write(name, data_root)
    task = load_task(cfg.taskpool, name, MEAN, STD, cfg.paths.data, image_size=224)
    assert task.num_classes == NUM_CLASSES[name] == len(task.classnames)
    assert all(t.count("{}") == 1 for t in task.templates)

    train, val, test = task.split("train"), task.split("val"), task.split("test")
    n_val = min(int(0.1 * n_train), 5000)
    assert (len(train), len(val), len(test)) == (n_train - n_val, n_val, n_test)
    assert not set(train.indices) & set(val.indices)
    assert set(train.labels) | set(val.labels) == labels
    assert set(test.labels) <= labels and len(set(test.labels)) > 1
    for split in (train, val, test):
        x, y = split[0]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and isinstance(y, int)
    # the same bytes twice: val carving is deterministic
    again = load_task(cfg.taskpool, name, MEAN, STD, cfg.paths.data)
    assert np.array_equal(again.split("val").indices, val.indices)


def test_labels_follow_the_files(pool, tmp_path):
    """SVHN's '10' is the digit 0; MNIST labels are the idx labels; images normalised with the model's mean / std."""
    cfg = pool("svhn", "mnist")
    data_root = tmp_path / "data_root"
    fx.write_svhn(data_root / "svhn")
    fx.write_mnist(data_root / "mnist")
    svhn = load_task(cfg.taskpool, "svhn", MEAN, STD, cfg.paths.data).split("test")
    assert list(svhn.labels) == [(i % 10 + 1) % 10 for i in range(10)]
    mnist = load_task(cfg.taskpool, "mnist", MEAN, STD, cfg.paths.data).split("test")
    assert list(mnist.labels) == list(range(10))
    x, _ = mnist[0]
    assert -2.5 < float(x.min()) < 0 < float(x.max()) < 2.5  # normalised, not 0..1 or 0..255


def test_eval_transform_is_deterministic_and_train_augments(pool, tmp_path):
    cfg = pool("gtsrb")
    fx.write_gtsrb(tmp_path / "data_root")
    task = load_task(cfg.taskpool, "gtsrb", MEAN, STD, cfg.paths.data, image_size=224)
    test = task.split("test")
    assert torch.equal(test[0][0], test[0][0])
    torch.manual_seed(0)
    train = task.split("train")
    assert not torch.equal(train[0][0], train[0][0])  # open_clip's RandomResizedCrop
    batch_x, batch_y = next(iter(DataLoader(test, batch_size=4)))
    assert batch_x.shape == (4, 3, 224, 224) and batch_y.dtype == torch.int64
    pickle.loads(pickle.dumps(train))  # DataLoader workers need picklable data sets


def test_val_carving_matches_random_split():
    """val = the task-vectors split: random_split(train, [n - n_val, n_val], Generator().manual_seed(0))."""
    for n, n_val in ((1000, 100), (73257, 5000), (19, 1)):
        train, val = carve_val(n)
        ref_train, ref_val = torch.utils.data.random_split(range(n), [n - n_val, n_val],
                                                           generator=torch.Generator().manual_seed(0))
        assert (train, val) == (list(ref_train.indices), list(ref_val.indices))


def test_image_folder_layout_and_data_root_as_torchvision_root(pool, tmp_path):
    data_root = tmp_path / "data_root"
    fx.write_image_folder(data_root / "resisc45", ["airplane", "sea_ice", "thermal_power_station"])
    fx.write_mnist(data_root)  # torchvision MNIST(root=<data_root>): <data_root>/MNIST/raw
    cfg = pool("resisc45", "mnist")
    resisc = load_task(cfg.taskpool, "resisc45", MEAN, STD, cfg.paths.data)
    assert set(resisc.split("test").labels) == {0, 35, 43}
    assert find_layout("mnist", data_root)[1] == data_root
    assert len(load_task(cfg.taskpool, "mnist", MEAN, STD, cfg.paths.data).split("test")) == 10


def test_missing_data_set_names_folder_and_layout(pool, tmp_path):
    cfg = pool("mnist")
    with pytest.raises(DatasetNotFoundError) as e:
        load_task(cfg.taskpool, "mnist", MEAN, STD, cfg.paths.data)
    msg = str(e.value)
    assert str(tmp_path / "data_root" / "mnist") in msg
    assert "MNIST/raw" in msg
    assert "paths.data_root" in msg and "{train,test}" in msg
    assert "dataset_dict.json" in msg and "data/{train,test}-*.parquet" in msg  # the Hugging Face layout


def test_sun397_without_partitions_is_explained(tmp_path):
    root = tmp_path / "sun397"
    fx.write_sun397(root)
    for f in (root / "SUN397" / "Partitions").iterdir():
        f.unlink()
    layout, where = find_layout("sun397", tmp_path)
    loader = eight_tasks.SplitLoader(eight_tasks.TASKS["sun397"], layout, where, 224, MEAN, STD)
    with pytest.raises(DatasetNotFoundError, match="Training_01.txt"):
        loader("train")


def test_taskpool_config_and_subset(pool, make_cfg):
    cfg = make_cfg("taskpool=eight_tasks")
    assert cfg.taskpool.source == "eight_tasks"
    assert list(cfg.taskpool.tasks) == ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert known_tasks(cfg.taskpool) == list(cfg.taskpool.tasks)
    sub = pool("mnist", "svhn")
    assert list(sub.taskpool.tasks) == ["mnist", "svhn"]
    assert sub.taskpool.data_root.endswith("data_root")


def test_class_names_are_clean_data():
    for name, task in eight_tasks.TASKS.items():
        assert len(task.classnames) == NUM_CLASSES[name]
        normed = [re.sub(r"[^0-9a-z]", "", c.lower()) for c in task.classnames]
        assert len(set(normed)) == len(normed), name
        for t in task.templates:
            assert isinstance(t, str) and t.format("x").count("x") >= 1
    # label alignment spot checks
    assert eight_tasks.class_index(eight_tasks.TASKS["sun397"], "apartment_building/outdoor") == 8
    assert eight_tasks.class_index(eight_tasks.TASKS["eurosat"], "SeaLake") == 9
    assert eight_tasks.class_index(eight_tasks.TASKS["gtsrb"], "00042") == 42


# ---- Hugging Face `datasets` copies -------------------------------------------------------------------------------
HF_NAMES = ["wetland", "airplane", "sea ice"]  # ClassLabel order differs from ours: resisc45 classes 44, 0, 35
HF_EXPECTED = [44, 0, 35]


def _write_hf(root, kind, splits=(("train", 12), ("test", 4)), features=None, offset=0):
    """A copy written by the real `datasets` library: grey images (mode L), label offset + i % 3."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    features = features or datasets.Features({"image": datasets.Image(),
                                              "label": datasets.ClassLabel(names=HF_NAMES)})
    image, label = features
    rng = np.random.default_rng(0)
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {image: [Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8), "L") for _ in range(n)],
             label: [offset + i % 3 for i in range(n)]}, features=features)
        for split, n in splits})
    if kind == "save_to_disk":
        dd.save_to_disk(str(root))
    for split, ds in dd.items():
        if kind == "parquet":  # a Hub snapshot, e.g. tanganke/resisc45
            (root / "data").mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        elif kind == "parquet_split_folders":
            (root / split).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(root / split / "0000.parquet"))


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "parquet_split_folders"])
def test_hugging_face_copy(kind, pool, tmp_path):
    data_root = tmp_path / "data_root"
    _write_hf(data_root / "resisc45", kind)
    assert find_layout("resisc45", data_root) == (eight_tasks._HF, data_root / "resisc45")
    cfg = pool("resisc45")
    task = load_task(cfg.taskpool, "resisc45", MEAN, STD, cfg.paths.data, image_size=224)
    train, val, test = task.split("train"), task.split("val"), task.split("test")
    assert (len(train), len(val), len(test)) == (11, 1, 4)
    assert list(test.labels) == [HF_EXPECTED[i % 3] for i in range(4)]  # mapped by ClassLabel name
    assert list(train.labels) + list(val.labels) == [HF_EXPECTED[i % 3] for i in [*train.indices, *val.indices]]
    assert task._load.uncached("test").dataset[0][0].mode == "RGB"
    x, y = next(iter(DataLoader(test, batch_size=4, num_workers=0)))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.tolist() == list(test.labels)
    again = pickle.loads(pickle.dumps(test))  # DataLoader workers
    assert torch.equal(again[3][0], test[3][0]) and again[3][1] == test[3][1]
    if kind != "save_to_disk":
        assert (data_root / "resisc45" / ".hf_cache").is_dir()  # parquet -> arrow, cached next to the data


def test_hugging_face_copy_errors(pool, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    data_root = tmp_path / "data_root"
    plain = datasets.Features({"img": datasets.Image(), "labels": datasets.Value("int64")})
    _write_hf(data_root / "mnist", "parquet", splits=(("train", 6), ("test", 3)), features=plain)
    _write_hf(data_root / "svhn", "save_to_disk", features=plain, offset=8)
    _write_hf(data_root / "resisc45", "save_to_disk", splits=(("train", 6), ("validation", 3)))
    unknown = datasets.Features({"image": datasets.Image(),
                                 "label": datasets.ClassLabel(names=["banded", "zigzagged", "volcano"])})
    _write_hf(data_root / "dtd", "parquet", features=unknown)
    cfg = pool("mnist", "svhn", "resisc45", "dtd")

    def load(name, split):
        return load_task(cfg.taskpool, name, MEAN, STD, cfg.paths.data).split(split)

    assert list(load("mnist", "test").labels) == [0, 1, 2]  # plain integers are our class indices
    with pytest.raises(eight_tasks.DatasetFormatError, match=r"svhn/? \(test split\): column 'labels' must hold "
                       r"integer labels in \[0, 10\), found int64 values \[8, 9, 10"):
        load("svhn", "test")
    with pytest.raises(eight_tasks.DatasetFormatError, match=r"splits \['train', 'validation'\]; expected 'train'"):
        load("resisc45", "train")
    with pytest.raises(eight_tasks.DatasetFormatError,
                       match=r"dtd \(test split\): ClassLabel names of column 'label': unknown class 'volcano'"):
        load("dtd", "test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match=r"mnist holds a Hugging Face .*pip install 'fusion_bench\[hf\]'"):
        load("mnist", "train")


def test_eval_splits_decoded_once_into_a_cache_read_back_bitwise(pool, tmp_path, monkeypatch):
    from fusion_bench.data import eval_cache

    cfg = pool("dtd")
    fx.write_dtd(tmp_path / "data_root")
    cfg.taskpool.cache_eval = False
    plain = load_task(cfg.taskpool, "dtd", MEAN, STD, cfg.paths.data, image_size=224)
    cfg.taskpool.cache_eval = True
    cfg.paths.data = str(tmp_path / "cache_home")
    cached = load_task(cfg.taskpool, "dtd", MEAN, STD, cfg.paths.data, image_size=224)
    for split in ("val", "test"):
        ref, got = plain.split(split), cached.split(split)
        assert isinstance(got, eval_cache.CachedEvalSplit) and not isinstance(ref, eval_cache.CachedEvalSplit)
        assert np.array_equal(got.labels, ref.labels) and np.array_equal(got.indices, ref.indices)
        for i in range(len(ref)):  # the open_clip transform, bitwise
            assert torch.equal(got[i][0], ref[i][0]) and got[i][1] == ref[i][1]
        a = next(iter(DataLoader(pickle.loads(pickle.dumps(got)), batch_size=4, num_workers=2)))
        assert torch.equal(a[0], torch.stack([ref[i][0] for i in range(len(a[0]))]))
    assert not isinstance(cached.split("train"), eval_cache.CachedEvalSplit)  # train augments: never cached
    files = sorted(p.name for p in (tmp_path / "cache_home" / "eval_cache").iterdir())
    assert len(files) == 2 and all(f.startswith("dtd-") and f.endswith(".npy") for f in files)

    # a second run reads the cache without decoding an image
    monkeypatch.setattr(eval_cache._Uint8Images, "__getitem__", lambda *a: pytest.fail("decoded again"))
    again = load_task(cfg.taskpool, "dtd", MEAN, STD, cfg.paths.data, image_size=224).split("test")
    assert torch.equal(again[0][0], plain.split("test")[0][0])


def test_interrupted_cache_build_leaves_nothing(pool, tmp_path, monkeypatch):
    from fusion_bench.data import eval_cache

    cfg = pool("mnist")
    fx.write_mnist(tmp_path / "data_root" / "mnist")
    cfg.taskpool.cache_eval = True
    cfg.paths.data = str(tmp_path / "cache_home")
    real = eval_cache._Uint8Images.__getitem__

    def flaky(self, i):
        if i == 5:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(eval_cache._Uint8Images, "__getitem__", flaky)
    task = load_task(cfg.taskpool, "mnist", MEAN, STD, cfg.paths.data, image_size=224)
    with pytest.raises(KeyboardInterrupt):
        task.split("test")
    assert list((tmp_path / "cache_home" / "eval_cache").iterdir()) == []
    monkeypatch.setattr(eval_cache._Uint8Images, "__getitem__", real)
    assert len(task.split("test")) == 10
