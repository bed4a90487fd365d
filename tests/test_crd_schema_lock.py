"""The shared CRD's schema lock (tests/support/crd_schema_lock.py) across processes, as the test
sessions sharing one local cluster hold it: a schema change waits for tests using the schema, and
no test starts using it while a change is under way."""

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import crd_schema_lock

TESTS = Path(__file__).resolve().parent


def other_session(state_dir: Path, body: str) -> subprocess.Popen:
    """Another pytest session's process, holding the lock as `body` says."""
    script = textwrap.dedent(f"""
        import sys, time, types
        sys.path.insert(0, {str(TESTS)!r})
        from support import crd_schema_lock
        cluster = types.SimpleNamespace(state_dir=__import__("pathlib").Path({str(state_dir)!r}))
    """) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_a_schema_change_waits_for_tests_that_use_the_schema(tmp_path):
    cluster = SimpleNamespace(state_dir=tmp_path)
    user = other_session(tmp_path, """
        with crd_schema_lock.schema_in_use(cluster):
            print("using", flush=True)
            time.sleep(3)
    """)
    assert user.stdout.readline().strip() == "using"
    with pytest.raises(TimeoutError), crd_schema_lock.schema_change(cluster, timeout=0.5):
        pass
    user.wait(10)
    with crd_schema_lock.schema_change(cluster, timeout=5):
        pass


def test_no_test_starts_using_the_schema_during_a_change(tmp_path):
    cluster = SimpleNamespace(state_dir=tmp_path)
    with crd_schema_lock.schema_change(cluster, timeout=5):
        late = other_session(tmp_path, """
            try:
                with crd_schema_lock.schema_in_use(cluster, timeout=0.5):
                    print("started")
            except TimeoutError:
                print("waited")
        """)
        assert late.communicate(timeout=20)[0].strip() == "waited"
    after = other_session(tmp_path, """
        with crd_schema_lock.schema_in_use(cluster, timeout=5):
            print("started")
    """)
    assert after.communicate(timeout=20)[0].strip() == "started"
