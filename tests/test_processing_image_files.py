"""An image file gives the same pixels as the same picture in memory, transparency included."""

import numpy as np
import PIL.Image
import pytest

from pisces.processing import to_rgb_image


def _transparent_picture() -> PIL.Image.Image:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:6, 2:6] = (200, 30, 30, 255)  # an opaque red square on a fully transparent (black) background
    return PIL.Image.fromarray(rgba, "RGBA")


def test_a_transparent_png_file_is_composited_onto_white_like_the_image_in_memory(tmp_path):
    picture = _transparent_picture()
    path = tmp_path / "square.png"
    picture.save(path)
    from_file = np.asarray(to_rgb_image(path))
    np.testing.assert_array_equal(from_file, np.asarray(to_rgb_image(picture)))
    assert (from_file[0, 0] == 255).all() and tuple(from_file[3, 3]) == (200, 30, 30)
    np.testing.assert_array_equal(np.asarray(to_rgb_image(str(path))), from_file)


def test_a_truncated_image_file_is_a_clear_error(tmp_path):
    path = tmp_path / "square.png"
    _transparent_picture().resize((64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot be read as an image"):
        to_rgb_image(path)
