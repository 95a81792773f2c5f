"""User image-caption sources (folder, JSONL) and the Grain `Loader`: decoding, cropping,
skipping bad records, seeded shuffling, sharding, flips and exact resumption."""

import dataclasses
import io
import json
import warnings

import chex
import numpy as np
import pytest
from PIL import Image

from fluid.data import (
    BadRecord,
    DataStreamChangedError,
    FolderSource,
    JsonlSource,
    Loader,
    SkippedRecordWarning,
    load_image,
)
from fluid.data.shapes import ShapesDataset, caption_corpus
from fluid.text import train_text_tokenizer

N = 12  # coded images in the standard test folder
TEXT_LEN = 8
# A flat JPEG block keeps only its DC coefficient; at quality 90 its quantisation and the
# YCbCr round trip moved a channel by at most 1 level over 50 random colours: allow 3.
JPEG_ATOL = 3 / 127.5


def flat(rgb, size):
    return np.broadcast_to(np.asarray(rgb, np.float32) / 127.5 - 1, (size, size, 3))


def caption(i):
    return f"item {i}"


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer([caption(i) for i in range(N)] + caption_corpus(200), 64)


def coded(i):
    """8x8 image `i`: red encodes `i` everywhere, green is 0 on the left half and 255 on the
    right (so a mirror shows), blue is constant."""
    array = np.empty((8, 8, 3), np.uint8)
    array[..., 0] = 20 + 10 * i
    array[:, :4, 1], array[:, 4:, 1] = 0, 255
    array[..., 2] = 128
    return array


def ident(image):
    return round(float((image[..., 0].mean() + 1) * 127.5 - 20) / 10)


def is_mirrored(image):
    return bool(image[0, 0, 1] > 0)


def write(folder, name, image, text):
    path = folder / name
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        Image.fromarray(image).save(path)
    path.with_suffix(".txt").write_text(text)
    return path


def coded_folder(folder, n=N):
    for i in range(n):
        write(folder, f"{i:02d}.png", coded(i), caption(i))
    return folder


def truncated_png():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def make_loader(source, tok, **kwargs):
    kwargs = {"batch_size": 3, "seed": 0, "shard_index": 0, "shard_count": 1, **kwargs}
    return Loader(source, text_tokenizer=tok, text_len=TEXT_LEN, **kwargs)


def ids_of(batches):
    return [ident(image) for batch in batches for image in batch["image"]]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def check_pairing(batch, tok):
    """Every caption row is the caption of the image beside it."""
    expected, mask = tok.encode([caption(ident(image)) for image in batch["image"]], TEXT_LEN)
    np.testing.assert_array_equal(batch["text_ids"], expected)
    np.testing.assert_array_equal(batch["text_mask"], mask)


def test_folder_source_reads_sorted_pairs(tmp_path):
    # Written out of order, in a subfolder too, in PNG and JPEG, with non-square sizes.
    Image.new("RGB", (40, 30), (200, 40, 90)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  a pink box \n")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 50), (10, 250, 128)).save(tmp_path / "sub" / "c.PNG")
    (tmp_path / "sub" / "c.txt").write_text("a green box")
    Image.new("RGB", (30, 50), (60, 70, 230)).save(tmp_path / "a.jpg", quality=90)
    (tmp_path / "a.txt").write_text("a blue box")
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    source = FolderSource(tmp_path, 16)
    assert source.paths == ("a.jpg", "b.png", "sub/c.PNG")
    assert len(source) == 3 and source.missing_captions == 0
    items = [source[i] for i in range(3)]
    assert [it["caption"] for it in items] == ["a blue box", "a pink box", "a green box"]
    for it in items:
        chex.assert_shape(it["image"], (16, 16, 3))
        chex.assert_type(it["image"], np.float32)
    # Flat colours survive bicubic resizing exactly (its weights sum to 1).
    np.testing.assert_allclose(items[1]["image"], flat((200, 40, 90), 16), atol=1e-6)
    np.testing.assert_allclose(items[2]["image"], flat((10, 250, 128), 16), atol=1e-6)
    np.testing.assert_allclose(items[0]["image"], flat((60, 70, 230), 16), atol=JPEG_ATOL)
    assert FolderSource(tmp_path, 16).paths == source.paths


def test_centre_crop_keeps_the_middle(tmp_path):
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    # Wide, no resize needed: the crop is exactly the middle band.
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32], wide[:, 32:64], wide[:, 64:] = red, green, blue
    Image.fromarray(wide).save(tmp_path / "wide.png")
    np.testing.assert_array_equal(load_image(tmp_path / "wide.png", 32), flat(green, 32))
    # Tall, halved: 16x48 after resizing, rows 16-32 kept; rows that bicubic blends with the
    # neighbouring bands (two on each side at this scale) excluded from the exact check.
    tall = np.zeros((96, 32, 3), np.uint8)
    tall[:32], tall[32:64], tall[64:] = red, green, blue
    Image.fromarray(tall).save(tmp_path / "tall.png")
    image = load_image(tmp_path / "tall.png", 16)
    np.testing.assert_allclose(image[2:-2], flat(green, 16)[2:-2], atol=1e-6)
    assert np.all(image[..., 1] > image[..., 0]) and np.all(image[..., 1] > image[..., 2])
    # Odd margin: a 41x20 ramp cropped to 20 keeps columns (41 - 20) // 2 = 10 to 29.
    ramp = np.zeros((20, 41, 3), np.uint8)
    ramp[..., 0] = 5 * np.arange(41)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = load_image(tmp_path / "ramp.png", 20)
    np.testing.assert_allclose((image[0, :, 0] + 1) * 127.5, 5 * np.arange(10, 30), atol=1e-4)


def test_load_image_converts_modes_and_orientation(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png", 8)
    np.testing.assert_allclose(grey, flat((100, 100, 100), 8), atol=1e-6)
    Image.new("RGBA", (8, 8), (30, 60, 90, 10)).save(tmp_path / "alpha.png")
    alpha = load_image(tmp_path / "alpha.png", 8)
    # Composited over white: round((c * 10 + 255 * 245) / 255).
    np.testing.assert_allclose(alpha, flat((246, 247, 249), 8), atol=1e-6)
    # EXIF orientation 3 (rotated 180 degrees): the upright image has its halves swapped.
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(coded(0)).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(
        load_image(tmp_path / "turned.png", 8), coded(0)[::-1, ::-1] / np.float32(127.5) - 1
    )


def test_jsonl_source(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (24, 16), (0, 128, 255)).save(tmp_path / "img" / "rel.png")
    Image.new("RGB", (16, 16), (250, 5, 5)).save(tmp_path / "abs.png")
    lines = [
        json.dumps({"image": "img/rel.png", "caption": "relative"}),
        "",
        "{not json",
        json.dumps({"image": str(tmp_path / "abs.png"), "caption": "absolute"}),
        json.dumps({"image": "img/rel.png"}),
        json.dumps(["img/rel.png", "a list"]),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(SkippedRecordWarning, match=r"3 lines .*line 3 .*line 5 .*line 6"):
        source = JsonlSource(tmp_path / "data.jsonl", 16)
    assert len(source) == 2 and source.skipped_lines == 3
    assert [source[i]["caption"] for i in range(2)] == ["relative", "absolute"]
    np.testing.assert_allclose(source[0]["image"], flat((0, 128, 255), 16), atol=1e-6)
    np.testing.assert_allclose(source[1]["image"], flat((250, 5, 5), 16), atol=1e-6)


def test_missing_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*like cat.png \+ cat.txt"):
        FolderSource(tmp_path / "nowhere", 16)
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl does not exist"):
        JsonlSource(tmp_path / "missing.jsonl", 16)
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match=r"no images with .txt captions under"):
        FolderSource(tmp_path, 16)
    write(tmp_path, "paired.png", coded(0), caption(0))
    with pytest.warns(SkippedRecordWarning, match=r"1 images .*no .txt caption.*lonely.png"):
        source = FolderSource(tmp_path, 8)
    assert source.paths == ("paired.png",) and source.missing_captions == 1
    (tmp_path / "bad.jsonl").write_text("[]\n")
    with pytest.raises(ValueError, match="no usable records"), pytest.warns(SkippedRecordWarning):
        JsonlSource(tmp_path / "bad.jsonl", 16)


def bad_folder(folder):
    """Nine coded images with three bad records between them, in sorted order."""
    coded_folder(folder, 9)
    write(folder, "02x_random.png", np.random.default_rng(0).bytes(300), "random bytes")
    write(folder, "04x_truncated.png", truncated_png(), "a truncated png")
    write(folder, "06x_empty.png", coded(20), "  \n\t")
    return folder


def test_bad_records_raise_bad_record(tmp_path):
    source = FolderSource(bad_folder(tmp_path), 8)
    for name in ("02x_random.png", "04x_truncated.png", "06x_empty.png"):
        with pytest.raises(BadRecord, match=name):
            source[source.paths.index(name)]


def test_loader_skips_bad_records(tmp_path, tok):
    loader = make_loader(FolderSource(bad_folder(tmp_path), 8), tok, shuffle=False, num_epochs=1)
    with pytest.warns(SkippedRecordWarning) as record:
        batches = list(loader)
    messages = " ".join(str(w.message) for w in record)
    for name in ("02x_random.png", "04x_truncated.png", "06x_empty.png"):
        assert name in messages
    assert loader.skipped == 3
    # Every batch is full, in index order with the bad records left out.
    assert [b["image"].shape for b in batches] == [(3, 8, 8, 3)] * 3
    assert ids_of(batches) == list(range(9))
    for batch in batches:
        check_pairing(batch, tok)
        assert batch["text_ids"].dtype == np.int32 and batch["text_mask"].dtype == bool


BAD = ("02x_random.png", "04x_truncated.png", "06x_empty.png")  # bad_folder's


def skip_messages(record):
    return [str(w.message) for w in record if issubclass(w.category, SkippedRecordWarning)]


def test_each_bad_record_is_warned_about_and_counted_once(tmp_path, tok):
    source = FolderSource(bad_folder(tmp_path), 8)
    bad = sorted(source.paths.index(name) for name in BAD)
    loader = make_loader(source, tok)
    # "always": Python's own once-per-place filter must not be what hides repeats.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        take(loader, 12)  # 36 of the 9 good records: every bad file read in four epochs
    messages = skip_messages(record)
    assert len(messages) == 3 and all(any(name in m for m in messages) for name in BAD)
    assert loader.skipped == 3
    state = json.loads(json.dumps(loader.get_state()))
    assert state["skipped"] == 3 and state["bad"] == bad
    # Resumed, the bad files are read again, in four more epochs, and not warned about.
    resumed = make_loader(source, tok, state=state)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = take(resumed, 12)
        reference = take(loader, 12)
    assert skip_messages(record) == []
    assert resumed.skipped == loader.skipped == 3
    chex.assert_trees_all_equal(batches, reference)
    assert resumed.get_state() == loader.get_state()
    # A state saved before bad records were listed restarts the list.
    legacy = make_loader(source, tok, state={k: v for k, v in state.items() if k != "bad"})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chex.assert_trees_all_equal(take(legacy, 12), reference)
    assert len(skip_messages(record)) == 3 and legacy.skipped == 3
    # Skipping and counting once leave the batches as they were: in order, bad files out.
    with pytest.warns(SkippedRecordWarning) as record:
        in_order = take(make_loader(source, tok, shuffle=False), 6)
    assert ids_of(in_order) == list(range(9)) * 2 and len(skip_messages(record)) == 3


def test_all_bad_source_raises(tmp_path, tok):
    write(tmp_path, "a.png", b"not an image", "a")
    write(tmp_path, "b.png", b"nor this", "b")
    loader = make_loader(FolderSource(tmp_path, 8), tok)
    with pytest.raises(RuntimeError, match="no record"), pytest.warns(SkippedRecordWarning):
        next(loader)


def test_shuffle_is_seeded_and_reshuffled_per_epoch(tmp_path, tok):
    source = FolderSource(coded_folder(tmp_path), 8)
    order = ids_of(make_loader(source, tok, batch_size=4, num_epochs=2))
    first, second = order[:N], order[N:]
    assert sorted(first) == sorted(second) == list(range(N))
    assert first != list(range(N)) and second != first
    assert ids_of(make_loader(source, tok, batch_size=4, num_epochs=2)) == order
    assert ids_of(make_loader(source, tok, batch_size=4, num_epochs=2, seed=1)) != order


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_cover(tmp_path, tok, shuffle):
    source = FolderSource(coded_folder(tmp_path), 8)
    kwargs = {"batch_size": 2, "num_epochs": 1, "shuffle": shuffle, "shard_count": 2}
    shares = [ids_of(make_loader(source, tok, shard_index=i, **kwargs)) for i in range(2)]
    assert len(shares[0]) == len(shares[1]) == N // 2
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(N))


@pytest.mark.filterwarnings("ignore::fluid.data.SkippedRecordWarning")
def test_resume_reproduces_the_uninterrupted_batches(tmp_path, tok):
    folder = coded_folder(tmp_path)
    write(folder, "05x_bad.png", b"corrupt", "a corrupt image")  # moves batch boundaries
    source = FolderSource(folder, 8)
    kwargs = {"flip": True, "seed": 7}
    full = make_loader(source, tok, **kwargs)
    reference = take(full, 4)
    state = json.loads(json.dumps(full.get_state()))  # as a checkpoint stores it
    reference += take(full, 6)  # 30 records: into the third epoch
    assert full.skipped == state["skipped"] == 1  # one bad file, however many epochs read it
    resumed = make_loader(source, tok, state=state, **kwargs)
    chex.assert_trees_all_equal(take(resumed, 6), reference[4:])
    assert resumed.get_state() == full.get_state()
    # set_state rewinds a loader that has moved on.
    resumed.set_state(state)
    chex.assert_trees_all_equal(take(resumed, 6), reference[4:])
    other = make_loader(source, tok, flip=True, seed=8)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_workers_give_the_same_batches(tmp_path, tok):
    source = FolderSource(coded_folder(tmp_path), 8)
    reference = list(make_loader(source, tok, num_epochs=2, flip=True))
    loader = make_loader(source, tok, num_epochs=2, flip=True, workers=2)
    with loader:
        first = take(loader, 2)
        state = loader.get_state()
    # Resuming also works across worker counts: the state is a position in the records.
    batches = first + list(make_loader(source, tok, num_epochs=2, flip=True, state=state))
    chex.assert_trees_all_equal(batches, reference)


def test_flip(tmp_path, tok):
    source = FolderSource(coded_folder(tmp_path), 8)
    for batch in make_loader(source, tok, num_epochs=1):
        for image in batch["image"]:
            np.testing.assert_array_equal(image, source[ident(image)]["image"])
    flipped = list(make_loader(source, tok, num_epochs=2, flip=True))
    mirrored = [is_mirrored(image) for batch in flipped for image in batch["image"]]
    assert 0 < sum(mirrored) < len(mirrored)
    for batch in flipped:
        check_pairing(batch, tok)
        for image in batch["image"]:
            original = source[ident(image)]["image"]
            expected = original[:, ::-1] if is_mirrored(image) else original
            np.testing.assert_array_equal(image, expected)
    chex.assert_trees_all_equal(list(make_loader(source, tok, num_epochs=2, flip=True)), flipped)


def test_shapes_source(tok):
    shapes = ShapesDataset(16, seed=3)
    loader = make_loader(
        shapes, tok, batch_size=4, shuffle=False, shard_index=None, shard_count=None
    )
    assert loader.get_state()["stream"]["shard_count"] == 1  # jax.process_count()

    def batch(step):  # items [4 step, 4 step + 4), read directly
        items = [shapes[4 * step + i] for i in range(4)]
        ids, mask = tok.encode([it["caption"] for it in items], TEXT_LEN)
        return {"image": np.stack([it["image"] for it in items]), "text_ids": ids,
                "text_mask": mask}

    for step in range(2):
        chex.assert_trees_all_equal(next(loader), batch(step))
    # 2**31 - 1 items are shuffled lazily, not listed.
    shuffled = next(make_loader(shapes, tok, batch_size=4))
    assert not np.array_equal(shuffled["image"], batch(0)["image"])
    assert np.all(np.abs(shuffled["image"]) <= 1)


def test_a_changed_stream_is_explained(tmp_path, tok):
    folder = coded_folder(tmp_path)
    write(folder, "05x_bad.png", b"corrupt", "a corrupt image")
    source = FolderSource(folder, 8)  # 13 records, listed now
    loader = make_loader(source, tok)
    with pytest.warns(SkippedRecordWarning):
        take(loader, 5)
    state = json.loads(json.dumps(loader.get_state()))
    assert state["bad"] == [source.paths.index("05x_bad.png")]
    write(folder, "12.png", coded(12), caption(12))
    grown = FolderSource(folder, 8)
    advice = (
        r"Its position would name other records, so training cannot resume where it stopped\. "
        r"Start a new run in another output directory, or set data\.on_change=restart "
        r"\(on_change='restart' for a Loader\) to continue training this model on the current "
        r"data from the start of its order\."
    )
    with pytest.raises(
        DataStreamChangedError,
        match=r"the data source has 14 records now and had 13 when the checkpoint was saved\. "
        + advice,
    ):
        make_loader(grown, tok, state=state)
    changes = [
        ({"seed": 1}, r"the seed is 1 now and was 0"),
        ({"shuffle": False}, r"shuffle is False now and was True"),
        ({"flip": True}, r"flip is True now and was False"),
        ({"num_epochs": 3}, r"num_epochs is 3 now and was None"),
        (
            {"shard_index": 1, "shard_count": 2},
            r"this process reads shard 1 of 2 now and read shard 0 of 1",
        ),
        ({"seed": 1, "flip": True}, r"the seed is 1 now and was 0; flip is True now and was False"),
    ]
    for kwargs, change in changes:
        with pytest.raises(DataStreamChangedError, match=change + r"\. " + advice):
            make_loader(source, tok, state=state, **kwargs)
    # on_change="restart": the new stream from its start, its bad records unknown yet.
    with pytest.warns(UserWarning, match=r"14 records now and had 13.*from the start") as record:
        restarted = make_loader(grown, tok, state=state, on_change="restart")
    assert len(record) == 1
    fresh = make_loader(grown, tok)
    assert restarted.get_state() == fresh.get_state()
    assert restarted.get_state()["bad"] == [] and restarted.skipped == 0
    with pytest.warns(SkippedRecordWarning):
        chex.assert_trees_all_equal(take(restarted, 5), take(fresh, 5))
    # set_state takes it too; an unchanged stream resumes as usual, without a warning.
    other = make_loader(grown, tok, seed=5)
    with pytest.warns(UserWarning, match="from the start"):
        other.set_state(state, on_change="restart")
    assert other.position == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = make_loader(source, tok, state=state, on_change="restart")
    assert same.get_state() == state
    with pytest.raises(ValueError, match=r"on_change must be 'error' or 'restart', got 'ignore'"):
        make_loader(source, tok, on_change="ignore")
    with pytest.raises(ValueError, match=r"on_change must be"):
        same.set_state(state, on_change="continue")


def test_the_training_loader_takes_on_change_from_the_data_config():
    # `data.on_change` reaches the loader `fluid train` builds: a run resumed with another
    # seed is refused by default and restarts its stream with on_change=restart.
    from fluid.config import DataConfig
    from fluid.recipes import make_loader as training_loader

    source = ShapesDataset(16, size=16)
    tok = train_text_tokenizer(caption_corpus(), vocab_size=48)

    def make(config, state=None):
        return training_loader(source, config, text_tokenizer=tok, batch_size=4, text_len=8,
                               state=state)

    first = make(DataConfig(image_size=16))
    next(first)
    state = first.get_state()
    with pytest.raises(DataStreamChangedError, match="the seed is 1 now and was 0"):
        make(DataConfig(image_size=16, seed=1), state)
    with pytest.warns(UserWarning, match="from the start"):
        restarted = make(DataConfig(image_size=16, seed=1, on_change="restart"), state)
    assert restarted.position == 0
    assert make(DataConfig(image_size=16), state).position == first.position > 0


# -- class folders (torchvision's ImageFolder layout) ---------------------------------------------
def class_folders(root):
    """root/<class>/...: written out of name order, nested, with files and folders that are
    not data."""
    layout = {"dog/2.png": 2, "dog/1.png": 1, "cat/z/9.png": 9, "cat/5.jpg": 5, "cat/4.png": 4,
              "ant/7.png": 7, ".ipynb_checkpoints/3.png": 3, "cat/.hidden.png": 6}
    for name, i in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(coded(i)).save(root / name, quality=100)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes((root / "dog" / "1.png").read_bytes())  # not in a class
    (root / "empty").mkdir()
    return root


def test_image_folder_source_follows_torchvisions_order(tmp_path):
    from fluid.data import ImageFolderSource

    with pytest.warns(UserWarning, match=r"1 class folders .* hold no images .*: empty"):
        source = ImageFolderSource(class_folders(tmp_path), 8)
    # torchvision: classes are the sorted folder names, ids 0..K-1; an empty class keeps its
    # id; samples go class by class, each class's files in sorted walk order.
    assert source.classes == ("ant", "cat", "dog", "empty")
    assert source.class_to_idx == {"ant": 0, "cat": 1, "dog": 2, "empty": 3}
    assert source.paths == ("ant/7.png", "cat/4.png", "cat/5.jpg", "cat/z/9.png", "dog/1.png",
                            "dog/2.png")
    assert source.labels == (0, 1, 1, 1, 2, 2)
    assert len(source) == 6
    items = [source[i] for i in range(6)]
    assert [it["caption"] for it in items] == ["0", "1", "1", "1", "2", "2"]
    assert [source.caption(i) for i in range(6)] == ["0", "1", "1", "1", "2", "2"]
    assert [ident(it["image"]) for it in items] == [7, 4, 5, 9, 1, 2]
    chex.assert_shape(items[0]["image"], (8, 8, 3))
    # The captions are what the class-label tokenizer reads.
    from fluid.text import ClassLabelTokenizer

    ids, _ = ClassLabelTokenizer(4).encode([it["caption"] for it in items], 2)
    np.testing.assert_array_equal(ids[:, 0], source.labels)


def test_image_folder_source_refuses_what_holds_no_classes(tmp_path):
    from fluid import MissingInputError
    from fluid.data import ImageFolderSource

    with pytest.raises(MissingInputError, match=r"nowhere does not exist; .*root/cat/1.png"):
        ImageFolderSource(tmp_path / "nowhere", 8)
    Image.fromarray(coded(0)).save(tmp_path / "0.png")
    with pytest.raises(MissingInputError, match="no class folders in"):
        ImageFolderSource(tmp_path, 8)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.txt").write_text("x")
    with pytest.raises(MissingInputError, match=r"no images \(.png"):
        ImageFolderSource(tmp_path, 8)


def test_image_folder_data_config_and_class_names(tmp_path):
    from fluid import ConfigError
    from fluid.config import ComponentSpec, DataConfig
    from fluid.data import ImageFolderSource
    from fluid.presets import tiny
    from fluid.recipes import caption_tokenizer, make_source
    from fluid.text import ClassLabelTokenizer, load_caption_tokenizer

    with pytest.raises(ConfigError, match="needs data.path"):
        DataConfig(dataset="imagefolder")
    with pytest.warns(UserWarning, match="hold no images"):
        source = make_source(DataConfig(dataset="imagefolder", path=str(class_folders(tmp_path)),
                                        image_size=8))
    assert isinstance(source, ImageFolderSource)

    def model(num_classes):
        spec = ComponentSpec(name="class_labels", kwargs={"num_classes": num_classes, "dim": 8})
        return dataclasses.replace(tiny("fluid").model, text_encoder=spec)

    # A class-conditional model on class folders keeps their names with its tokenizer.
    tok = caption_tokenizer(source, model(5))
    assert isinstance(tok, ClassLabelTokenizer)
    assert (tok.num_classes, tok.class_names) == (5, ("ant", "cat", "dog", "empty"))
    tok.save(tmp_path / "tok.model")
    again = load_caption_tokenizer(tmp_path / "tok.model")
    assert again.class_names == tok.class_names and again.to_bytes() == tok.to_bytes()
    assert [again.label(c) for c in ("dog", "1", " ant ", "4")] == [2, 1, 0, 4]
    assert again.describe(2) == "2 dog" and again.describe(4) == "4"
    with pytest.raises(ConfigError, match=r"class 5 is out of range: the model has 5 classes"):
        again.label("5")
    with pytest.raises(ConfigError, match=r"no class named 'dgo'.*Closest: dog"):
        again.label("dgo")
    with pytest.raises(ConfigError, match="no names"):
        ClassLabelTokenizer(3).label("dog")
    # Fewer classes in the model than in the data: refused, naming the setting.
    with pytest.raises(ConfigError, match="kwargs.num_classes=4"):
        caption_tokenizer(source, model(3))
