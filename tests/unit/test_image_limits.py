"""The image image_limits are defined once (handlers/image_limits.py) and answered alike: the API's upload
check and the model server's decode give the same status and code for the same photograph."""
import pytest

from control_api import images
from control_api.errors import ApiError
from handlers import fundus, image_limits
from tests.support import images as samples


@pytest.mark.parametrize("data, code", [
    (samples.png_bomb(), "image_too_large"),
    (samples.png_bomb(10000, 10000), "image_too_large"),
    (samples.encode(samples.fundus_like((40, 300)), "PNG"), "image_too_small"),
])
def test_api_and_model_server_answer_a_size_alike(data, code):
    with pytest.raises(ApiError) as api:
        images.inspect(data)
    with pytest.raises(fundus.ImageRejected) as served:
        fundus.decode(data, min_side=224)
    expected = (image_limits.SIZE_STATUS, code)
    assert (api.value.status, api.value.code) == (served.value.status, served.value.code) == expected
    assert api.value.message == served.value.message


def test_the_limits_are_the_ones_both_apply():
    side, most = image_limits.MIN_SIDE, image_limits.MAX_PIXELS
    assert image_limits.size_problem(side, most // side) is None
    assert image_limits.size_problem(side, most // side + 1)[0] == "image_too_large"
    assert image_limits.size_problem(side - 1, 1000)[0] == "image_too_small"
    assert image_limits.SIZE_STATUS == 422  # 413 stays the answer to a body over MAX_UPLOAD_BYTES


def test_limits_import_no_imaging_or_model_stack():
    """The API image carries no torch: the module the API shares with the handler is stdlib only."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(image_limits.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__"}, imported
