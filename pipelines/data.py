"""Image folders for diffusion adapter training: validation, captions, resizing and aspect buckets.

Each image in a training folder (searched recursively; hidden files and folders are skipped) gets
its caption from, in order of precedence:
- `metadata.jsonl` at the folder root, one `{"file_name": ..., "text": ...}` per line (diffusers'
  convention; "caption" or "prompt" are accepted for "text"; file_name is relative to the root);
- a sidecar `<stem>.txt` next to the image.
With a prompt `template` ("a photo of {trigger} {caption}", or just "a sks dog") every prompt is
the template filled in, and captions are needed only where the template uses `{caption}`.

A loss mask is an image named like its training image with `.mask` before the extension
(`cat.png` -> `cat.mask.png`, any image extension): white counts, black is ignored, grey in between.
Masks are never training images themselves; each must have its image's size.

`validate_image_folder` reads every file before training starts, collects every problem and raises
one `UserError` listing them; it never writes anything. A file is an image by its extension
(IMAGE_EXTENSIONS); a picture under another extension is skipped and named in the report's
warnings rather than sniffed into the training set, so what trains is what the user can see.
`ImageCaptionDataset` is built on that report; `BucketBatchSampler` and `bucket_batches` batch one
aspect bucket at a time (the latter is what the training loop uses: full batches, a fixed count per
epoch). `shuffle_tags` shuffles a caption's comma-separated tags (the loop's --shuffle-captions).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import string
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from pipelines.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_KEYS = ("text", "caption", "prompt")
METADATA_FILE = "metadata.jsonl"
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 16
MAX_CAPTION_CHARS = 10_000  # a caption describes one picture; the text encoder reads its first 77 tokens
DARK_16_BIT = 4096  # a 16-bit image whose brightest value is below this is (nearly) black as 8 bits
MAX_LISTED = 20  # problems listed in one error message before "and N more"
MASK_MARK = ".mask"  # <stem>.mask.<image extension> is the loss mask of <stem>.<image extension>


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: tuple[int, int]  # (width, height) as displayed, i.e. after EXIF orientation
    prompt: str
    mask: Path | None = None  # its loss mask (<stem>.mask.png), if the folder has one


@dataclass
class FolderReport:
    """What `validate_image_folder` found: the usable images with their prompts, and warnings."""

    root: Path
    records: list[ImageRecord]
    warnings: list[str] = field(default_factory=list)


def _listing(items: Sequence[str], limit: int = MAX_LISTED) -> list[str]:
    return list(items[:limit]) + ([f"and {len(items) - limit} more"] if len(items) > limit else [])


def _fail(root: Path, problems: list[tuple[str, str]]) -> UserError:
    lines = _listing([f"{name}: {reason}" for name, reason in problems])
    header = f"image folder {root}: {len(problems)} problem(s); nothing was trained or written. Fix them and run again:"
    return UserError("\n".join([header, *(f"  - {line}" for line in lines)]))


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    # PIL refuses images over MAX_IMAGE_PIXELS when it reads their header (before decoding), so a
    # decompression bomb never reaches load(). It only warns between 1x and 2x the limit: make
    # that an error too. Restored afterwards: the limit is process-global.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied, transparency composited on white, any mode to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: PIL's convert("RGB") would clip at 255
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        image = background
    return image if image.mode == "RGB" else image.convert("RGB")


class _Refused(Exception):
    """One file's problem: what is wrong with it and what to do."""


def _check_image(path: Path, max_pixels: int, min_side: int) -> tuple[tuple[int, int], str]:
    """(displayed size, pixel hash) of a usable image, or _Refused(reason)."""
    if path.stat().st_size == 0:
        raise _Refused("empty file (0 bytes); delete it or replace it with the real image")
    try:
        with _pixel_limit(max_pixels):
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
                image.verify()  # structure and checksums, without decoding
            with Image.open(path) as image:  # verify() leaves the file unusable: reopen to decode
                if min(width, height) < min_side:
                    raise _Refused(
                        f"too small: {width}x{height} px, the shorter side must be at least "
                        f"{min_side} px; use a larger picture or remove it"
                    )
                image.load()  # truncated data only shows up when decoding
                _check_bit_depth(image)
                rgb = to_rgb(image)
    except UnidentifiedImageError:
        raise _Refused(
            "not an image: no image format recognises its content (a misnamed file?); "
            "delete it or replace it with a real image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        found = re.search(r"\((\d+) pixels\)", str(error))  # PIL gives the size only in its message
        size = f"{int(found.group(1)):,} pixels" if found else str(error)
        raise _Refused(f"too large: {size}, over the limit of {max_pixels:,}; downscale it or remove it") from None
    except _Refused:
        raise
    except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt data; report, don't crash
        raise _Refused(
            f"unreadable or truncated ({type(error).__name__}: {error}); re-export or re-copy it, or delete it"
        ) from None
    digest = hashlib.sha1(rgb.tobytes(), usedforsecurity=False).hexdigest()
    return rgb.size, f"{rgb.size}:{digest}"


def _check_bit_depth(image: Image.Image) -> None:
    """A 16-bit image is trained as 8 bits (its top 8 bits); one whose values never reach the top bits
    (12-bit camera or scanner data stored in 16) would train as a black picture: refused, with why."""
    if image.mode.startswith("I"):
        _, high = image.getextrema()
        if high < DARK_16_BIT:
            raise _Refused(
                f"16-bit image whose brightest value is {high} of 65535: as 8 bits it is black or nearly "
                "(12-bit data?); re-export it as 8-bit, scaled to its range"
            )


def _read_text(path: Path, relative: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as error:
        raise _Refused(
            f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            f"re-save {relative} as UTF-8"
        ) from None


def _read_caption(path: Path, relative: str) -> str:
    """A sidecar caption's text: UTF-8 and at most MAX_CAPTION_CHARS characters (a 10 MB file is not one)."""
    if path.stat().st_size > 4 * MAX_CAPTION_CHARS:
        raise _Refused(
            f"caption file of {path.stat().st_size:,} bytes, over the limit of {MAX_CAPTION_CHARS:,} characters; "
            "a caption describes one picture in a sentence or a few: is it the right file?"
        )
    text = _read_text(path, relative)
    _check_caption_length(text)
    return text


def _check_caption_length(text: str) -> None:
    if len(text.strip()) > MAX_CAPTION_CHARS:
        raise _Refused(
            f"caption of {len(text.strip()):,} characters, over the limit of {MAX_CAPTION_CHARS:,}; a caption "
            "describes one picture in a sentence or a few (the text encoder reads its first 77 tokens)"
        )


def _read_metadata(root: Path, images: set[Path], problems: list[tuple[str, str]]) -> dict[Path, str]:
    """Captions from metadata.jsonl; each broken line is a problem naming its line number."""
    path = root / METADATA_FILE
    try:
        text = _read_text(path, METADATA_FILE)
    except _Refused as error:
        problems.append((METADATA_FILE, str(error)))
        return {}
    captions: dict[Path, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{METADATA_FILE} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append((where, f"not valid JSON ({error.msg}); write one JSON object per line"))
            continue
        keys = [key for key in CAPTION_KEYS if isinstance(entry, dict) and key in entry]
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not keys:
            problems.append(
                (
                    where,
                    'needs a "file_name" string and a caption under "text", "caption" or "prompt", '
                    'e.g. {"file_name": "0001.png", "text": "a red cube"}',
                )
            )
            continue
        caption, image = entry[keys[0]], Path(os.path.normpath(root / entry["file_name"]))
        if not isinstance(caption, str):
            problems.append((where, f'"{keys[0]}" must be a string, got {type(caption).__name__}'))
        elif len(caption.strip()) > MAX_CAPTION_CHARS:
            problems.append(
                (
                    where,
                    f"caption of {len(caption.strip()):,} characters, over the limit of "
                    f"{MAX_CAPTION_CHARS:,}; a caption describes one picture in a sentence or a few",
                )
            )
        elif image not in images:
            reason = "is not an image in this folder" if image.is_file() else "does not exist"
            problems.append((where, f"file_name {entry['file_name']!r} {reason}; fix the name or remove the line"))
        elif image in captions:
            problems.append((where, f"{entry['file_name']!r} is listed twice; keep one line per image"))
        else:
            captions[image] = caption.strip()
    return captions


def _template_fields(template: str | None, trigger: str | None) -> set[str]:
    if template is None:
        if trigger is not None:
            raise UserError(f"trigger={trigger!r} needs a template to go into, e.g. template='a photo of {{trigger}}'")
        return set()
    if not template.strip():
        raise UserError("template is empty; pass a prompt such as 'a photo of {trigger}', or no template")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise UserError(
            f"template {template!r} is malformed ({error}); write literal braces as {{{{ and }}}}"
        ) from None
    if names - {"trigger", "caption"}:
        raise UserError(
            f"template {template!r} uses {{{sorted(names - {'trigger', 'caption'})[0]}}}; "
            "only {trigger} and {caption} are filled in"
        )
    if ("trigger" in names) != (trigger is not None):
        raise UserError(
            f"template {template!r} and trigger={trigger!r} disagree: pass a trigger exactly "
            "when the template contains {trigger}"
        )
    return names


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _folder_listing(path: str | Path) -> tuple[Path, list[Path], list[Path], list[tuple[str, str]]]:
    """(the folder, every visible file in it, the images among them, the problems of links that lead
    nowhere); a missing, empty or image-less folder is an error at once (nothing else can be checked)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        reason = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"image folder {root} {reason}; pass the folder that holds the training images")
    root = root.resolve()
    visible = [p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files = sorted(p for p in visible if p.is_file())
    links = _broken_links(root, visible)
    if not files and not links:
        raise UserError(f"image folder {root} is empty; put the training images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images and links:
        raise _fail(root, links)
    if not images:
        found = ", ".join(_listing([_relative(root, p) for p in files], 5))
        raise UserError(
            f"image folder {root} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}); it holds: {found}"
        )
    return root, files, images, links


def _broken_links(root: Path, paths: list[Path]) -> list[tuple[str, str]]:
    """Problems for the links among `paths` that lead nowhere (a dangling link, a loop): named, never skipped."""
    problems = []
    for path in sorted(p for p in paths if p.is_symlink() and not p.exists()):
        try:
            os.stat(path)
            reason = "a link that cannot be followed"
        except OSError as error:
            if error.errno == errno.ELOOP:
                reason = "a link that loops back on itself"
            else:
                reason = f"a broken link (to {os.readlink(path)}, which does not exist)"
        problems.append((_relative(root, path), f"{reason}; fix the link or delete it"))
    return problems


def _captions(
    root: Path,
    files: list[Path],
    images: list[Path],
    report: FolderReport,
    problems: list[tuple[str, str]],
    masks: Sequence[Path] = (),
) -> tuple[dict[Path, str], set[Path]]:
    """(image -> caption from metadata.jsonl or its sidecar .txt, images whose sidecar is unreadable)."""
    image_set = set(images)
    captions = _read_metadata(root, image_set, problems) if (root / METADATA_FILE).is_file() else {}
    images_by_stem: dict[Path, list[Path]] = defaultdict(list)
    for image in images:
        images_by_stem[image.with_suffix("")].append(image)
    broken_sidecars: set[Path] = set()
    for p in files:
        if p.suffix.lower() == ".txt":
            try:
                text = _read_caption(p, _relative(root, p))
            except _Refused as error:
                problems.append((_relative(root, p), str(error)))
                broken_sidecars.update(images_by_stem.get(p.with_suffix(""), []))  # reported once, here
                continue
            for image in images_by_stem.get(p.with_suffix(""), []):
                captions.setdefault(image, text.strip())  # metadata.jsonl wins over a sidecar
            if p.with_suffix("") not in images_by_stem:
                report.warnings.append(f"{_relative(root, p)}: caption without an image; it is ignored")
        elif p not in image_set and p not in masks and p != root / METADATA_FILE:
            report.warnings.append(
                f"{_relative(root, p)}: skipped, not an image by its extension "
                f"({', '.join(IMAGE_EXTENSIONS)}); rename it if it is one"
            )
    return captions, broken_sidecars


def _checked_image(
    root: Path, image: Path, max_pixels: int, min_side: int, problems: list[tuple[str, str]]
) -> tuple[tuple[int, int], str] | None:
    """(size, pixel digest) of a usable image, or None with its problem recorded."""
    try:
        return _check_image(image, max_pixels, min_side)
    except _Refused as error:
        problems.append((_relative(root, image), str(error)))
    except OSError as error:  # permissions, a file removed meanwhile
        problems.append((_relative(root, image), f"cannot be read ({error.strerror or error}); check the file"))
    return None


def _identical_images(
    root: Path, hashes: dict[str, list[Path]], report: FolderReport, problems: list[tuple[str, str]]
) -> None:
    """Every image the same picture is a problem; some identical pictures are a warning."""
    readable = sum(len(group) for group in hashes.values())
    if len(hashes) == 1 and readable > 1:
        copies = ", ".join(_listing([_relative(root, p) for p in next(iter(hashes.values()))], 5))
        problems.append(
            (
                f"all {readable} images",
                f"have identical pixels ({copies}); add different pictures (to train on one picture, "
                "keep one copy: every step shows it anyway)",
            )
        )
    for group in hashes.values():
        if 1 < len(group) < readable:
            report.warnings.append(f"identical images: {', '.join(_listing([_relative(root, p) for p in group], 5))}")


def _is_mask(path: Path) -> bool:
    return path.stem.endswith(MASK_MARK) and path.stem != MASK_MARK


def _masks_of(root: Path, images: list[Path], masks: list[Path], report: FolderReport) -> dict[Path, Path]:
    """image -> its mask (same folder and stem, `.mask` before the extension); a mask without an image is a warning."""
    by_stem: dict[Path, list[Path]] = defaultdict(list)
    for image in images:
        by_stem[image.with_suffix("")].append(image)
    found: dict[Path, Path] = {}
    for mask in masks:
        owners = by_stem.get(mask.with_suffix("").with_suffix(""), [])
        if not owners:
            report.warnings.append(f"{_relative(root, mask)}: a loss mask without its image; it is ignored")
        for image in owners:
            found.setdefault(image, mask)
    return found


def _checked_mask(
    root: Path, mask: Path | None, size: tuple[int, int], max_pixels: int, problems: list[tuple[str, str]]
) -> Path | None:
    """The mask if it is a readable image of its image's size (else None, with its problem recorded)."""
    if mask is None:
        return None
    checked = _checked_image(root, mask, max_pixels, 1, problems)
    if checked is None:
        return None
    if checked[0] != size:
        problems.append(
            (
                _relative(root, mask),
                f"the mask is {checked[0][0]}x{checked[0][1]} px but its image is {size[0]}x{size[1]}; "
                "a mask must have its image's size",
            )
        )
        return None
    return mask


def _no_caption(root: Path, image: Path, template: str | None, empty: bool) -> tuple[str, str]:
    """The problem of an image without a caption, or (`empty`) whose caption is blank or whitespace only."""
    needs = "the template uses {caption}, but it" if template else "it"
    if empty:
        return (
            _relative(root, image),
            f"{needs} has an empty caption (blank or whitespace only, in {image.with_suffix('.txt').name} or its "
            f"{METADATA_FILE} line); write what the picture shows, or pass a template",
        )
    return (
        _relative(root, image),
        f"{needs} has no caption; add {image.with_suffix('.txt').name} next to it or a {METADATA_FILE} line, "
        "or pass a template",
    )


def validate_image_folder(
    path: str | Path,
    *,
    template: str | None = None,
    trigger: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> FolderReport:
    """Check every file of an image folder; return its images and prompts or raise one UserError.

    Problems (all collected, then raised together): a missing, empty or image-less folder; empty,
    non-image, unreadable or truncated image files; images over `max_pixels` (refused before
    decoding) or with a side under `min_side`; 16-bit images that would train as black; links that
    lead nowhere (dangling or looping); captions that are not UTF-8 or over MAX_CAPTION_CHARS; broken
    metadata.jsonl lines or entries naming missing files; images without a caption, or with a blank
    one, where the prompt needs one; and every image identical to the others. Duplicate groups short
    of that are warnings.
    """
    root, files, images, links = _folder_listing(path)
    fields = _template_fields(template, trigger)
    report = FolderReport(root, [])
    problems: list[tuple[str, str]] = list(links)
    masks = [p for p in images if _is_mask(p)]
    images = [p for p in images if not _is_mask(p)]
    if not images:
        raise UserError(
            f"image folder {root} holds only loss masks (*{MASK_MARK}.png); put the training images beside them"
        )
    captions, broken_sidecars = _captions(root, files, images, report, problems, masks)
    mask_of = _masks_of(root, images, masks, report)
    hashes: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        checked = _checked_image(root, image, max_pixels, min_side, problems)
        if checked is None:
            continue
        size, digest = checked
        hashes[digest].append(image)
        mask = _checked_mask(root, mask_of.get(image), size, max_pixels, problems)
        caption = captions.get(image) or None  # an empty caption is no caption
        if caption is None and (template is None or "caption" in fields):
            if image not in broken_sidecars:  # whose caption file was already reported
                problems.append(_no_caption(root, image, template, empty=image in captions))
            continue
        prompt = caption if template is None else template.format(trigger=trigger, caption=caption)
        report.records.append(ImageRecord(image, size, prompt, mask))
    _identical_images(root, hashes, report, problems)
    if problems:
        raise _fail(root, problems)
    for message in report.warnings:
        logger.warning("%s: %s", root, message)
    return report


def load_prompts(source: str | Path | Sequence[str]) -> list[str]:
    """Prompts for sample images: a list of them, or the path of a UTF-8 file with one per line (# comments)."""
    if isinstance(source, (str, Path)):  # a lone string is a path: a typo'd file name must not become a prompt
        if not Path(source).is_file():
            raise UserError(f"prompt file {source} does not exist; pass a text file with one prompt per line")
        try:
            text = _read_text(Path(source), str(source))
        except _Refused as error:
            raise UserError(f"prompt file {source}: {error}") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    else:
        prompts = [str(prompt).strip() for prompt in source]
    if not prompts or not all(prompts):
        raise UserError(f"no prompts in {source!r}; give at least one non-empty prompt")
    return prompts


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets, multiples of `step`, area <= resolution², aspect within max_ratio."""
    if resolution % step:
        raise UserError(f"resolution {resolution} must be a multiple of bucket_step {step} when buckets=True")
    buckets = {(resolution, resolution)}
    for width in range(step, int(resolution * max_ratio) + 1, step):
        height = resolution * resolution // width // step * step  # the largest that keeps the area
        if height >= step and 1 / max_ratio <= width / height <= max_ratio:
            buckets.add((width, height))
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to `size`'s (in log space: 2:1 ~ 1:2)."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(aspect - math.log(buckets[i][0] / buckets[i][1])))


def resize_and_crop(
    image: Image.Image,
    target: tuple[int, int],
    crop: str,
    rng: np.random.Generator,
    top_left: tuple[int, int] | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover `target` (w, h), then crop to it; returns the crop and its (top, left). A given
    `top_left` (an earlier call's, for the image's mask) is used instead of a center or random one."""
    width, height = image.size
    scale = max(target[0] / width, target[1] / height)
    resized = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    spare_x, spare_y = resized[0] - target[0], resized[1] - target[1]
    if top_left is not None:
        top, left = top_left
    elif crop == "random":
        left, top = int(rng.integers(spare_x + 1)), int(rng.integers(spare_y + 1))
    else:
        left, top = spare_x // 2, spare_y // 2
    return image.crop((left, top, left + target[0], top + target[1])), (top, left)


def shuffle_tags(caption: str, keep: int, generator: torch.Generator) -> str:
    """`caption`'s comma-separated tags in a random order (from `generator`), the first `keep` of them in
    place: "sks dog, red collar, grass, sunny" with keep=1 may become "sks dog, sunny, red collar, grass".
    Tags are stripped and joined with ", "; a caption without commas is one tag and stays as it is."""
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    head, rest = tags[:keep], tags[keep:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(head + [rest[i] for i in order])


class ImageCaptionDataset(Dataset):
    """A validated image folder as training items.

    Item i: {"pixel_values": float (3, H, W) in [-1, 1], "prompt": str, "path": str,
    "original_size": long (2,) = (h, w) before resizing, "crop_top_left": long (2,) = (top, left)
    (these two are SDXL's size conditioning), "flipped": bool (mirrored this epoch)}, and with
    `masks=True` "mask": float (1, H, W) in [0, 1], the image's loss mask resized, cropped and flipped
    with it (all ones for an image without one). Items are square `resolution` crops, or with
    `buckets=True` the size of the image's aspect bucket (`render(i, size)` draws one at another size).
    Random crops and flips depend only on (seed, epoch, i), so a resumed run sees the same pixels; call
    `set_epoch` to vary them.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int = 512,
        *,
        template: str | None = None,
        trigger: str | None = None,
        repeats: int = 1,
        crop: str = "center",
        random_flip: bool = False,
        buckets: bool = False,
        bucket_step: int = 64,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
        masks: bool = False,
    ) -> None:
        if crop not in ("center", "random"):
            raise UserError(f"crop={crop!r} is not one of 'center', 'random'")
        if repeats < 1 or resolution < 1:
            raise UserError(f"repeats and resolution must be >= 1, got repeats={repeats}, resolution={resolution}")
        self.report = validate_image_folder(
            root, template=template, trigger=trigger, max_pixels=max_pixels, min_side=min_side
        )
        self.records = self.report.records
        self.resolution, self.repeats, self.crop, self.random_flip = resolution, repeats, crop, random_flip
        self.seed, self.epoch, self.max_pixels, self.masks = seed, 0, max_pixels, masks
        self.buckets = make_buckets(resolution, bucket_step) if buckets else [(resolution, resolution)]
        self._record_buckets = [assign_bucket(r.size, self.buckets) for r in self.records]

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    @property
    def bucket_ids(self) -> list[int]:
        """The bucket index of every item (for BucketBatchSampler)."""
        return self._record_buckets * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def mask_count(self) -> int:
        """How many of the images have a loss mask."""
        return sum(record.mask is not None for record in self.records)

    def __getitem__(self, index: int) -> dict:
        return self.render(index)

    def render(self, index: int, size: tuple[int, int] | None = None) -> dict:
        """Item `index`, at `size` (width, height) instead of its bucket's when given (the same crop
        and flip draws)."""
        record = self.records[index % len(self.records)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        with _pixel_limit(self.max_pixels), Image.open(record.path) as image:
            image = to_rgb(image)
        original_size = torch.tensor([image.height, image.width])
        target = size or self.buckets[self._record_buckets[index % len(self.records)]]
        image, top_left = resize_and_crop(image, target, self.crop, rng)
        flip = self.random_flip and rng.random() < 0.5
        if flip:
            image = ImageOps.mirror(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3) in [-1, 1]
        item = {
            "pixel_values": pixels.permute(2, 0, 1).contiguous(),
            "prompt": record.prompt,
            "path": str(record.path),
            "original_size": original_size,
            "crop_top_left": torch.tensor(top_left),
            "flipped": flip,
        }
        if self.masks:
            item["mask"] = self._mask(record, target, top_left, flip, rng)
        return item

    def _mask(
        self, record: ImageRecord, target: tuple[int, int], top_left: tuple[int, int], flip: bool, rng
    ) -> torch.Tensor:
        """The record's mask as (1, H, W) in [0, 1], cropped and flipped as its image was (ones without one)."""
        if record.mask is None:
            return torch.ones(1, target[1], target[0])
        with _pixel_limit(self.max_pixels), Image.open(record.mask) as mask:
            mask = to_rgb(mask).convert("L")
        mask, _ = resize_and_crop(mask, target, self.crop, rng, top_left=top_left)
        if flip:
            mask = ImageOps.mirror(mask)
        return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share one bucket (so they stack), shuffled by (seed, epoch)."""

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.groups: dict[int, list[int]] = defaultdict(list)
        for index, bucket in enumerate(bucket_ids):
            self.groups[bucket].append(index)
        self.batch_size, self.shuffle, self.drop_last, self.seed, self.epoch = batch_size, shuffle, drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(group) / self.batch_size) for group in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket in sorted(self.groups):
            group = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(group)
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)  # interleave buckets so no stretch of training sees one aspect only
        yield from batches


def bucket_batches(bucket_ids: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s batches of item indices, each `batch_size` items of one bucket, for the training loop.

    Each bucket's items are shuffled by (seed, epoch) and cut into batches; a bucket's last batch is
    filled up from its start, so every batch is full (a bucket smaller than a batch repeats its items).
    The batches are then shuffled across buckets. Every epoch has `bucket_batch_count` batches, so a
    step's batch depends only on (seed, step): exact resume, and every process can take its share."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[int, list[int]] = defaultdict(list)
    for index, bucket in enumerate(bucket_ids):
        groups[bucket].append(index)
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for bucket in sorted(groups):
        group = list(groups[bucket])
        rng.shuffle(group)
        count = math.ceil(len(group) / batch_size)
        cycled = [group[k % len(group)] for k in range(count * batch_size)]
        batches += [cycled[k * batch_size : (k + 1) * batch_size] for k in range(count)]
    return [batches[k] for k in rng.permutation(len(batches))]


def bucket_batch_count(bucket_ids: Sequence[int], batch_size: int) -> int:
    """How many batches `bucket_batches` makes per epoch: the sum over buckets of ceil(items / batch_size)."""
    sizes: dict[int, int] = defaultdict(int)
    for bucket in bucket_ids:
        sizes[bucket] += 1
    return sum(math.ceil(size / batch_size) for size in sizes.values())
