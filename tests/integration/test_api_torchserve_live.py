"""The API's TorchServe client against a real TorchServe serving the tiny test model
(tests/plugins/model.py); the stubbed answers are in tests/unit/test_api_torchserve.py."""
import pytest

from control_api.torchserve import ImageRejected, TorchServeClient, UnknownModelVersion

pytestmark = pytest.mark.integration

@pytest.fixture
def real_client(torchserve):
    return TorchServeClient(torchserve.inference_url, torchserve.management_url, "dr", 60,
                            key_file=str(torchserve.key_file))


def test_real_prediction_follows_the_contract(real_client, sample_paths):
    answer = real_client.predict(sample_paths[0].read_bytes(), "image/jpeg")
    assert set(answer) >= {"grade", "label", "probabilities", "referable", "referable_threshold", "gradable",
                           "quality", "model", "disclaimer", "timings_ms"}
    assert answer["model"]["name"] == "dr" and answer["model"]["version"] == "1.0"
    assert answer["model"]["synthetic_training_data"] is True and "synthetic" in answer["disclaimer"].lower()
    if answer["gradable"]:
        assert 0 <= answer["grade"] <= 4 and len(answer["probabilities"]) == 5


def test_real_rejection_and_unknown_version(real_client, sample_paths):
    with pytest.raises(ImageRejected) as info:
        real_client.predict(b"this is not a photograph", "image/jpeg")
    assert 400 <= info.value.status < 500 and info.value.code
    with pytest.raises(UnknownModelVersion):
        real_client.predict(sample_paths[0].read_bytes(), "image/jpeg", version="9.9")


def test_real_models_and_readiness(real_client):
    assert real_client.ready() is True
    versions = real_client.models()
    assert [(v.version, v.default) for v in versions] == [("1.0", True)]
    assert versions[0].ready_workers >= 1
