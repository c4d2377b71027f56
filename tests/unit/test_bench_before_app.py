"""bench/before_app.py, the benchmark's "before" half: a real recreation of the old image check."""
import subprocess
import sys

from scripts.serving.processes import REPO


def test_the_before_app_decodes_what_the_api_now_only_opens(tmp_path):
    """bench/before_app.py is a real "before": it refuses a truncated JPEG that the API's header
    check lets through. In a subprocess, because the app patches control_api.images on import."""
    data = (REPO / "samples" / "idrid_01.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    code = (
        "import sys\n"
        "from control_api import images\n"
        "from control_api.errors import ApiError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "images.inspect(data)\n"  # the header alone is fine
        "from bench import before_app as bench_app\n"
        "try:\n"
        "    images.inspect(data)\n"
        "except ApiError as exc:\n"
        "    print(exc.status, exc.code)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(truncated)], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                              "DATABASE_URL": f"sqlite:///{tmp_path / 'clarity.db'}",
                              "LOCAL_STORAGE_DIR": str(tmp_path / "images")}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["422", "undecodable_image"]
