import subprocess
import sys


def test_import_pisces_is_light_and_never_imports_training():
    code = (
        "import sys, time, torch, transformers, diffusers\n"
        "start = time.perf_counter()\n"
        "import pisces\n"
        "print(time.perf_counter() - start)\n"
        "assert not any(name.startswith('pisces.training') for name in sys.modules), 'training imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) < 5.0  # well under a second on a quiet machine


def test_public_names():
    import pisces

    for name in ["PiscesConfig", "PiscesModel", "PiscesForConditionalGeneration", "PiscesProcessor"]:
        assert hasattr(pisces, name)
