"""`proalign-engine doctor`: what is live here, as text or JSON."""
import json

from click.testing import CliRunner

from proalign.cli import main


def test_doctor_json_writes_a_file_or_stdout(tmp_path):
    """--json PATH means the same in every command: JSON written to PATH (doctor: - for stdout)."""
    out = tmp_path / "doctor.json"
    r = CliRunner().invoke(main, ["doctor", "--json", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and "numba" in json.loads(out.read_text())["backends"]
    r = CliRunner().invoke(main, ["doctor", "--json", "-"], catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.stdout)["backends"]["torch"]["live"] is True
