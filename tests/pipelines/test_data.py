"""Image folders: captions, prompts, resizing, EXIF, alpha, buckets, and every bad input's error."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipelines.data import (
    BucketBatchSampler,
    ImageCaptionDataset,
    assign_bucket,
    bucket_batch_count,
    bucket_batches,
    load_prompts,
    make_buckets,
    shuffle_tags,
    to_rgb,
    validate_image_folder,
)
from pipelines.errors import UserError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def image(path: Path, size: tuple[int, int] = (24, 24), colour=(200, 30, 30), mode: str = "RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def folder(root: Path, n: int = 3, captions: bool = True) -> Path:
    """n distinct small images, each with a sidecar caption."""
    for i in range(n):
        image(root / f"img{i}.png", colour=COLOURS[i])
        if captions:
            (root / f"img{i}.txt").write_text(f"caption {i}\n")
    return root


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


# --- captions and prompts -----------------------------------------------------------------------


def test_sidecar_captions(tmp_path):
    report = validate_image_folder(folder(tmp_path))
    assert [(r.path.name, r.prompt, r.size) for r in report.records] == [
        ("img0.png", "caption 0", (24, 24)),
        ("img1.png", "caption 1", (24, 24)),
        ("img2.png", "caption 2", (24, 24)),
    ]
    assert report.warnings == []


@pytest.mark.parametrize("key", ["text", "caption", "prompt"])
def test_metadata_jsonl_captions_win_over_sidecars(tmp_path, key):
    folder(tmp_path, n=2)
    image(tmp_path / "sub" / "deep.png", colour=COLOURS[4])
    lines = [{"file_name": "img0.png", key: "from metadata"}, {"file_name": "sub/deep.png", key: "nested"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    prompts = {r.path.relative_to(tmp_path).as_posix(): r.prompt for r in validate_image_folder(tmp_path).records}
    assert prompts == {"img0.png": "from metadata", "img1.png": "caption 1", "sub/deep.png": "nested"}


def test_template_with_trigger_and_caption(tmp_path):
    folder(tmp_path, n=2)
    report = validate_image_folder(tmp_path, template="a photo of {trigger} {caption}", trigger="sks")
    assert [r.prompt for r in report.records] == ["a photo of sks caption 0", "a photo of sks caption 1"]


def test_fixed_template_needs_no_captions_and_repeats(tmp_path):
    folder(tmp_path, n=3, captions=False)
    dataset = ImageCaptionDataset(tmp_path, 16, template="a sks dog", repeats=4)
    assert len(dataset) == 12
    assert {dataset[i]["prompt"] for i in range(12)} == {"a sks dog"}
    assert [Path(dataset[i]["path"]).name for i in (0, 3, 4)] == ["img0.png", "img0.png", "img1.png"]


@pytest.mark.parametrize(
    "template, trigger, needle",
    [
        ("a photo of {subject}", None, "{subject}"),
        ("a photo of {trigger}", None, "pass a trigger"),
        ("a photo of a dog", "sks", "pass a trigger"),
        (None, "sks", "needs a template"),
        ("a photo of {", None, "malformed"),
        ("  ", None, "template is empty"),
    ],
)
def test_bad_templates(tmp_path, template, trigger, needle):
    with pytest.raises(UserError, match="template") as error:
        validate_image_folder(folder(tmp_path), template=template, trigger=trigger)
    assert needle in str(error.value)


def test_load_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# samples\na red cube\n\n  a blue moon  \n")
    assert load_prompts(path) == load_prompts(str(path)) == ["a red cube", "a blue moon"]
    assert load_prompts(["x", " y "]) == ["x", "y"]
    path.write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="not UTF-8"):
        load_prompts(path)
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="does not exist"):
        load_prompts("promts.txt")  # a typo is an error, not a prompt
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(["a cube", " "])


# --- pixels -------------------------------------------------------------------------------------


def test_resize_crop_shapes_and_range(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    image(tmp_path / "white.png", (30, 50), (255, 255, 255))
    image(tmp_path / "black.jpg", (40, 40), (0, 0, 0))
    dataset = ImageCaptionDataset(tmp_path, 32, template="x")
    items = {Path(dataset[i]["path"]).name: dataset[i] for i in range(len(dataset))}
    for item in items.values():
        assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    assert torch.allclose(items["white.png"]["pixel_values"], torch.ones(3, 32, 32))
    assert torch.allclose(items["black.jpg"]["pixel_values"], -torch.ones(3, 32, 32), atol=0.02)
    # wide 100x60 -> 53x32 -> centre crop starts at x = (53 - 32) // 2
    assert items["wide.png"]["original_size"].tolist() == [60, 100]
    assert items["wide.png"]["crop_top_left"].tolist() == [0, 10]


def test_random_crop_and_flip_are_seeded(tmp_path):
    half = np.zeros((40, 120, 3), np.uint8)
    half[:, 60:] = 255  # left black, right white: crops and flips change the picture
    Image.fromarray(half).save(tmp_path / "a.png")

    def pixels(seed, epoch=0):
        dataset = ImageCaptionDataset(tmp_path, 16, template="x", crop="random", random_flip=True, seed=seed, repeats=8)
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])

    first = pixels(0)
    assert torch.equal(first, pixels(0))
    assert not torch.equal(first, pixels(1)) and not torch.equal(first, pixels(0, epoch=1))
    assert len({tuple(item.flatten().tolist()) for item in first}) > 1  # repeats are augmented differently


def test_exif_orientation_is_honoured(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left red, right blue as stored
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "phone.jpg") as raw:
        assert raw.size == (40, 20)
        upright = np.asarray(to_rgb(raw))
    assert upright.shape == (40, 20, 3)  # displayed portrait: the stored left (red) is now the top
    assert upright[5, 10, 0] > 200 > upright[5, 10, 2] and upright[35, 10, 2] > 200 > upright[35, 10, 0]
    record = validate_image_folder(tmp_path, template="x").records[0]
    assert record.size == (20, 40)
    item = ImageCaptionDataset(tmp_path, 64, template="x", buckets=True, bucket_step=16)[0]
    assert item["pixel_values"].shape == (3, 80, 48)  # the portrait bucket


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: white
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half transparent black over white: grey
        ("LA", (0, 255), (0, 0, 0)),
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_modes_become_rgb_on_white(mode, colour, expected):
    rgb = to_rgb(Image.new(mode, (4, 4), colour))
    assert rgb.mode == "RGB" and np.abs(np.asarray(rgb)[0, 0].astype(int) - expected).max() <= 1


def test_palette_transparency_and_16_bit_grey(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as grey:
        assert np.asarray(to_rgb(grey))[0, 0].tolist() == [255, 255, 255]


def test_rgba_file_composited_in_dataset(tmp_path):
    image(tmp_path / "clear.png", (20, 20), (0, 0, 0, 0), mode="RGBA")
    assert torch.equal(ImageCaptionDataset(tmp_path, 16, template="x")[0]["pixel_values"], torch.ones(3, 16, 16))


# --- buckets ------------------------------------------------------------------------------------


def test_make_buckets():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0 and 0.5 <= width / height <= 2
        assert 0.8 * 512 * 512 <= width * height <= 512 * 512
    with pytest.raises(UserError, match="multiple of bucket_step"):
        make_buckets(100)


@pytest.mark.parametrize("size", [(1000, 500), (500, 1000), (300, 300), (640, 480), (480, 640), (1920, 1080), (7, 3)])
def test_assign_bucket_picks_the_closest_aspect(size):
    buckets = make_buckets(512)
    chosen = buckets[assign_bucket(size, buckets)]
    distance = [abs(np.log(size[0] / size[1]) - np.log(w / h)) for w, h in buckets]
    assert abs(np.log(size[0] / size[1]) - np.log(chosen[0] / chosen[1])) == min(distance)
    assert (chosen[0] > chosen[1]) == (size[0] > size[1]) and (chosen[0] == chosen[1]) == (size[0] == size[1])


def test_bucket_sampler_yields_single_bucket_batches(tmp_path):
    for i in range(5):
        image(tmp_path / f"wide{i}.png", (90, 50), COLOURS[i])
        image(tmp_path / f"tall{i}.png", (50, 90), COLOURS[i])
    for i in range(3):
        image(tmp_path / f"square{i}.png", (60, 60), COLOURS[i])
    dataset = ImageCaptionDataset(tmp_path, 64, template="x", buckets=True, bucket_step=16, repeats=2)
    assert dataset.buckets == [(48, 80), (64, 64), (80, 48)]
    for i in range(len(dataset)):
        name = Path(dataset[i]["path"]).name
        shape = dataset[i]["pixel_values"].shape
        assert shape == {"wide": (3, 48, 80), "tall": (3, 80, 48), "square": (3, 64, 64)}[name.rstrip("0123456789.png")]
    sampler = BucketBatchSampler(dataset.bucket_ids, 4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 3 + 2  # 10, 10 and 6 items in batches of 4
    assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
    assert all(len({dataset.bucket_ids[i] for i in batch}) == 1 for batch in batches)
    assert batches == list(BucketBatchSampler(dataset.bucket_ids, 4, seed=3))
    sampler.set_epoch(1)
    assert batches != list(sampler)
    dropped = BucketBatchSampler(dataset.bucket_ids, 4, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 2 + 2 + 1 and all(len(b) == 4 for b in dropped)
    for batch in DataLoader(dataset, batch_sampler=sampler):
        assert batch["pixel_values"].shape[0] == len(batch["prompt"]) <= 4


# --- bad inputs ---------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height: a decompression bomb if anyone decoded it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def truncated(path: Path, fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def with_metadata(*lines: str):
    def build(root: Path) -> None:
        folder(root, n=2, captions=False)
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    return build


BAD_FOLDERS = {
    "missing folder": (lambda root: root.rmdir(), {}, ["does not exist"]),
    "empty folder": (lambda root: None, {}, ["is empty"]),
    "no images": (lambda root: (root / "notes.txt").write_text("hi"), {}, ["has no images", "notes.txt"]),
    "zero-size file": (
        lambda root: (folder(root), (root / "zero.png").touch()),
        {},
        ["zero.png", "empty file (0 bytes)"],
    ),
    "text renamed .png": (
        lambda root: (folder(root), (root / "fake.png").write_text("not a picture")),
        {},
        ["fake.png", "not an image"],
    ),
    "truncated png": (lambda root: (folder(root), truncated(root / "cut.png", "PNG")), {}, ["cut.png", "truncated"]),
    "truncated jpeg": (lambda root: (folder(root), truncated(root / "cut.jpg", "JPEG")), {}, ["cut.jpg", "truncated"]),
    "decompression bomb": (
        lambda root: (folder(root), (root / "bomb.png").write_bytes(png_header(100_000, 100_000))),
        {},
        ["bomb.png", "too large: 10,000,000,000 pixels", "downscale it"],
    ),
    "over max_pixels": (
        lambda root: (folder(root), image(root / "big.png", (40, 40))),
        {"max_pixels": 1000},
        ["big.png", "too large: 1,600 pixels, over the limit of 1,000"],
    ),
    "too small": (
        lambda root: (folder(root), image(root / "tiny.png", (8, 30))),
        {},
        ["tiny.png", "too small: 8x30 px", "use a larger picture"],
    ),
    "all duplicates": (
        lambda root: [image(root / f"same{i}.png", colour=(9, 9, 9)) for i in range(3)],
        {"template": "x"},
        ["all 3 images", "identical pixels", "same0.png, same1.png, same2.png"],
    ),
    "caption not UTF-8": (
        lambda root: (folder(root), (root / "img1.txt").write_bytes(b"caf\xe9 au lait")),
        {},
        ["img1.txt", "not UTF-8", "0xe9"],
    ),
    "metadata not UTF-8": (
        lambda root: (folder(root), (root / "metadata.jsonl").write_bytes(b"\xff\n")),
        {},
        ["metadata.jsonl", "not UTF-8"],
    ),
    "metadata broken line": (
        with_metadata('{"file_name": "img0.png", "text": "a"}', '{"file_name": "img1.png", "te'),
        {},
        ["metadata.jsonl line 2", "not valid JSON"],
    ),
    "metadata missing keys": (
        with_metadata('{"file_name": "img0.png"}', '["img1.png", "b"]'),
        {},
        ["metadata.jsonl line 1", "metadata.jsonl line 2", '"file_name"'],
    ),
    "metadata names a missing file": (
        with_metadata(
            '{"file_name": "img0.png", "text": "a"}',
            '{"file_name": "img1.png", "text": "b"}',
            '{"file_name": "ghost.png", "text": "c"}',
        ),
        {},
        ["metadata.jsonl line 3", "'ghost.png' does not exist"],
    ),
    "image without caption": (
        lambda root: (folder(root), image(root / "lonely.png", colour=(1, 2, 3))),
        {},
        ["lonely.png", "no caption", "lonely.txt"],
    ),
    "template needs caption": (
        lambda root: (folder(root), image(root / "lonely.png", colour=(1, 2, 3))),
        {"template": "{trigger} {caption}", "trigger": "sks"},
        ["lonely.png", "uses {caption}", "no caption"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_refused_with_a_clear_error_and_nothing_written(tmp_path, case):
    build, options, needles = BAD_FOLDERS[case]
    root = tmp_path / "images"
    root.mkdir()
    build(root)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as error:
        validate_image_folder(root, **options)
    message = str(error.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert snapshot(tmp_path) == before
    with pytest.raises(UserError):  # the dataset validates the same way
        ImageCaptionDataset(root, 16, **options)
    assert snapshot(tmp_path) == before


def test_every_problem_is_collected_and_long_lists_are_cut(tmp_path):
    folder(tmp_path, n=2)
    (tmp_path / "fake.png").write_text("no")
    (tmp_path / "img0.txt").write_bytes(b"\xff")
    image(tmp_path / "tiny.png", (4, 4))
    message = str(pytest.raises(UserError, validate_image_folder, tmp_path).value)
    assert "3 problem(s)" in message and all(name in message for name in ("fake.png", "img0.txt", "tiny.png"))
    for i in range(25):
        (tmp_path / f"zero{i:02d}.png").touch()
    lines = str(pytest.raises(UserError, validate_image_folder, tmp_path).value).splitlines()
    assert "28 problem(s)" in lines[0] and len(lines) == 1 + 20 + 1 and lines[-1].strip() == "- and 8 more"


def test_warnings_for_partial_duplicates_and_skipped_files(tmp_path):
    folder(tmp_path, n=2)
    image(tmp_path / "copy.png", colour=COLOURS[0])
    (tmp_path / "copy.txt").write_text("copy")
    (tmp_path / "picture.dat").write_bytes((tmp_path / "img0.png").read_bytes())
    (tmp_path / "orphan.txt").write_text("no image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    report = validate_image_folder(tmp_path)
    assert len(report.records) == 3
    assert any("identical images" in w and "copy.png" in w and "img0.png" in w for w in report.warnings)
    assert any("picture.dat" in w and "rename" in w for w in report.warnings)
    assert any("orphan.txt" in w for w in report.warnings)
    assert not any(".DS_Store" in w for w in report.warnings)


# --- loss masks, bucket batches for the training loop, tag shuffling -----------------------------------


def test_masks_beside_images_are_masks_not_training_images(tmp_path):
    folder(tmp_path, n=3)
    mask = np.zeros((24, 24), np.uint8)
    mask[:, :12] = 255
    Image.fromarray(mask).save(tmp_path / "img0.mask.png")
    image(tmp_path / "orphan.mask.png", colour=(255, 255, 255))
    report = validate_image_folder(tmp_path)
    assert [(r.path.name, r.mask.name if r.mask else None) for r in report.records] == [
        ("img0.png", "img0.mask.png"),
        ("img1.png", None),
        ("img2.png", None),
    ]
    assert any("orphan.mask.png" in w and "without its image" in w for w in report.warnings)
    assert not any("skipped" in w for w in report.warnings)
    plain = ImageCaptionDataset(tmp_path, 16)
    assert "mask" not in plain[0] and plain.mask_count == 1
    masked = ImageCaptionDataset(tmp_path, 16, masks=True)
    assert torch.equal(masked[1]["mask"], torch.ones(1, 16, 16))  # no mask: counts everywhere
    left = masked[0]["mask"]
    assert left.shape == (1, 16, 16) and left[..., :7].min() > 0.99 and left[..., 9:].max() < 0.01


def test_a_mask_is_cropped_and_flipped_with_its_image(tmp_path):
    picture = np.zeros((40, 120, 3), np.uint8)
    picture[:, 60:] = 255  # right half white
    Image.fromarray(picture).save(tmp_path / "a.png")
    Image.fromarray(picture[..., 0]).save(tmp_path / "a.mask.png")  # the mask is the same picture
    dataset = ImageCaptionDataset(
        tmp_path, 16, template="x", crop="random", random_flip=True, repeats=16, masks=True, seed=2
    )
    flips = set()
    for i in range(len(dataset)):
        item = dataset[i]
        brightness = (item["pixel_values"].mean(0) + 1) / 2  # the image in [0, 1]
        assert (brightness - item["mask"][0]).abs().max() < 0.02
        flips.add(bool(item["mask"][0, :, 0].mean() > 0.5))
    assert flips == {True, False}  # flipped and unflipped crops were both seen, the mask always along


def test_a_mask_of_another_size_is_refused(tmp_path):
    folder(tmp_path, n=2)
    image(tmp_path / "img1.mask.png", (20, 24), (255, 255, 255))
    with pytest.raises(UserError, match="img1.mask.png: the mask is 20x24 px but its image is 24x24"):
        validate_image_folder(tmp_path)


def test_bucket_batches_are_full_single_bucket_and_a_fixed_count_per_epoch():
    bucket_ids = [0] * 5 + [1] * 1 + [2] * 4
    count = bucket_batch_count(bucket_ids, 4)
    assert count == 2 + 1 + 1
    for epoch in range(3):
        batches = bucket_batches(bucket_ids, 4, seed=1, epoch=epoch)
        assert len(batches) == count and all(len(batch) == 4 for batch in batches)
        assert all(len({bucket_ids[i] for i in batch}) == 1 for batch in batches)
        assert set().union(*map(set, batches)) == set(range(len(bucket_ids)))  # every item each epoch
    assert bucket_batches(bucket_ids, 4, 1, 0) == bucket_batches(bucket_ids, 4, 1, 0)
    assert bucket_batches(bucket_ids, 4, 1, 0) != bucket_batches(bucket_ids, 4, 1, 1)


def test_shuffle_tags_keeps_the_first_ones():
    caption = "sks dog, red collar ,grass, sunny,, park"
    orders = {shuffle_tags(caption, 1, torch.Generator().manual_seed(seed)) for seed in range(40)}
    assert all(order.startswith("sks dog, ") for order in orders) and len(orders) > 5
    assert all(
        sorted(order.split(", ")) == sorted(["sks dog", "red collar", "grass", "sunny", "park"]) for order in orders
    )
    assert shuffle_tags("one tag only", 0, torch.Generator().manual_seed(0)) == "one tag only"
    assert shuffle_tags("a, b, c", 5, torch.Generator().manual_seed(0)) == "a, b, c"
