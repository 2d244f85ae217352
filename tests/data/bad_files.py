"""Plants the damaged and unusual files that ImageNet holds (or a bad copy of it would) into a tree."""

from pathlib import Path

from PIL import Image


def plant_bad_files(root: Path) -> dict[str, str]:
    """Writes one file of each kind into ``root/train``'s class folders; returns {kind: relative path}."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    source = next((root / "train" / classes[0]).iterdir())
    planted = {}

    def place(kind: str, index: int) -> Path:
        path = root / "train" / classes[index % len(classes)] / f"planted_{kind}.JPEG"
        planted[kind] = str(path.relative_to(root))
        return path

    data = source.read_bytes()
    place("truncated", 0).write_bytes(data[: len(data) // 2])
    place("zero_byte", 1).write_bytes(b"")
    with Image.open(source) as image:
        image.save(place("png_as_jpeg", 2), format="PNG")
        image.convert("CMYK").save(place("cmyk", 0), format="JPEG")
        image.convert("L").save(place("grayscale", 1), format="JPEG")
    return planted
