"""Images that are none of CIFAR-10's classes, made offline, to measure the `unknown` flag on.

Two kinds. Synthetic ones drawn here from a seed: uniform noise, flat colours, linear gradients
and text rendered in PIL's default font, the screenshots-and-blanks end of what users send.
Natural photos shipped inside scikit-image (`skimage.data`, the optional `ood` extra), cut into
32x32 crops and squashed whole, the way the endpoint squashes any photo: people, a cup, coins,
the moon, a rocket, microscopy, textures; and the 100 LFW face crops, the selfie case. Pictures of
a CIFAR class (skimage's cat `chelsea`, its horse silhouette) are left out. Every source is
(N, 32, 32, 3) uint8 and the same for the same seed.
"""

import logging
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

SIZE = 32
SYNTHETIC = ("noise", "flat", "gradient", "text")
NATURAL = ("photos", "faces")
# skimage.data photos none of whose content is a CIFAR-10 class.
PHOTOS = ("astronaut", "camera", "coffee", "coins", "moon", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel")
CROPS_PER_PHOTO = 24


def noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def flat(n: int, rng: np.random.Generator) -> np.ndarray:
    colours = rng.integers(0, 256, size=(n, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(colours, (n, SIZE, SIZE, 3)).copy()


def gradient(n: int, rng: np.random.Generator) -> np.ndarray:
    """Between two random colours along a random direction."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    angles = rng.uniform(0, 2 * np.pi, n)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, angle in enumerate(angles):
        t = np.cos(angle) * xs + np.sin(angle) * ys
        t = (t - t.min()) / (t.max() - t.min())
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out[i] = np.round(a + t[..., None] * (b - a)).astype(np.uint8)
    return out


def text(n: int, rng: np.random.Generator) -> np.ndarray:
    """A few random letters or digits in one colour on another, PIL's default font."""
    alphabet = string.ascii_letters + string.digits
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        background, ink = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        image = Image.new("RGB", (SIZE, SIZE), background)
        font = ImageFont.load_default(size=int(rng.integers(9, 17)))
        draw = ImageDraw.Draw(image)
        for line in range(int(rng.integers(1, 4))):
            word = "".join(rng.choice(list(alphabet), size=int(rng.integers(2, 6))))
            draw.text((int(rng.integers(0, 8)), 2 + line * 10), word, fill=ink, font=font)
        out[i] = np.asarray(image)
    return out


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def crops(image: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The whole image squashed to 32x32, then `count - 1` square crops of 1/8 to 1/2 of its
    short side, each resized with the endpoint's filter (bicubic)."""
    picture = Image.fromarray(_as_rgb_uint8(image))
    width, height = picture.size
    out = [picture.resize((SIZE, SIZE), Image.Resampling.BICUBIC)]
    for _ in range(count - 1):
        side = int(rng.integers(max(SIZE, min(width, height) // 8), max(SIZE, min(width, height) // 2) + 1))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        out.append(picture.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return np.stack([np.asarray(p) for p in out])


def natural(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """skimage's photos and faces, or {} (with a log line) when scikit-image is not installed."""
    try:
        from skimage import data as skdata
    except ImportError:
        log.warning("scikit-image is not installed (pip install '.[ood]'): natural-photo OOD sources %s skipped",
                    ", ".join(NATURAL))
        return {}
    photos = np.concatenate([crops(getattr(skdata, name)(), CROPS_PER_PHOTO, rng) for name in PHOTOS])
    faces = np.stack([np.asarray(Image.fromarray(_as_rgb_uint8(face)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
                      for face in skdata.lfw_subset()[:100]])  # the rest are non-faces
    return {"photos": photos, "faces": faces}


def ood_sources(per_source: int = 100, seed: int = 0, with_natural: bool = True) -> dict[str, np.ndarray]:
    """Every source by name: SYNTHETIC with per_source images each, then NATURAL when available."""
    rng = np.random.default_rng(seed)
    sources = {name: generate(per_source, rng) for name, generate in
               (("noise", noise), ("flat", flat), ("gradient", gradient), ("text", text))}
    if with_natural:
        sources.update(natural(rng))
    return sources
