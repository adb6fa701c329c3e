import pytest
from PIL import ImageFile

from latent_mca.importers.common import (
    BAD_JSON,
    KeyRegistry,
    RecordError,
    image_content,
    iter_records,
    read_image,
    strip_placeholders,
)

from .builders import image_bytes, write_file


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_read_image_returns_the_original_bytes(tmp_path, fmt, ext):
    data = write_file(tmp_path, f"x.{ext}", image_bytes(fmt))
    assert read_image(tmp_path, f"x.{ext}") == (data, ext)


def test_read_image_uses_the_content_not_the_file_name(tmp_path):
    data = write_file(tmp_path, "really_a_png.jpg", image_bytes("PNG"))
    assert read_image(tmp_path, "really_a_png.jpg") == (data, "png")


@pytest.mark.parametrize("name, data, reason", [
    ("text.png", b"hello, not an image", "bad_image"),
    ("half.png", image_bytes("PNG")[:150], "bad_image"),
    ("anim.gif", image_bytes("GIF"), "unsupported_image_format"),
])
def test_read_image_rejects(tmp_path, name, data, reason):
    write_file(tmp_path, name, data)
    with pytest.raises(RecordError) as info:
        read_image(tmp_path, name)
    assert info.value.reason == reason and name in info.value.detail


def test_read_image_missing_names_the_file(tmp_path):
    with pytest.raises(RecordError, match="sub/none.png") as info:
        read_image(tmp_path, "sub/none.png")
    assert info.value.reason == "missing_image"


def test_truncated_jpeg_fails_even_if_pil_is_told_to_load_truncated_images(tmp_path, monkeypatch):
    jpeg = image_bytes("JPEG")
    write_file(tmp_path, "t.jpg", jpeg[: len(jpeg) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RecordError, match="truncated"):
        read_image(tmp_path, "t.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global setting is restored


@pytest.mark.parametrize("text, expected", [
    ("<image>\nWhat is it?", [{"type": "image"}, {"type": "text", "text": "What is it?"}]),
    ("What is it?", [{"type": "image"}, {"type": "text", "text": "What is it?"}]),
    ("What is it?\n<image>", [{"type": "text", "text": "What is it?"}, {"type": "image"}]),
    ("<image>", [{"type": "image"}]),
    ("", [{"type": "image"}]),
])
def test_image_content(text, expected):
    assert image_content(text) == expected


def test_strip_placeholders():
    assert strip_placeholders("<image>\nHello <image> there") == "Hello there"


def test_key_registry_never_hands_out_a_key_twice():
    keys = KeyRegistry()
    claimed = [keys.claim(k) for k in ("a.b", "a_b", "a/b", "a_b_dup1")]
    assert claimed == ["a_b", "a_b_dup1", "a_b_dup2", "a_b_dup1_dup1"]
    assert not keys.is_duplicate("x") and keys.is_duplicate("x") and not keys.is_duplicate("y")


def test_iter_records_jsonl_counts_bad_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\n\n{broken\n{"id": 2}\n')
    items = list(iter_records(path))
    assert [label for label, _ in items] == ["line 1", "line 3", "line 4"]
    assert items[0][1] == {"id": 1} and items[2][1] == {"id": 2}
    assert isinstance(items[1][1], RecordError) and items[1][1].reason == BAD_JSON


def test_iter_records_array_labels_positions(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('\n  [{"id": "a"}, 3]')
    assert list(iter_records(path)) == [("#0", {"id": "a"}), ("#1", 3)]


def test_iter_records_broken_array_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a"},')
    with pytest.raises(ValueError, match="broken.json"):
        list(iter_records(path))
