"""Names follow one set of rules, shared by the coordinator and hostd: never a `/`, never a
leading `.`, never a trailing newline (which `$` would accept)."""

from __future__ import annotations

import pytest

from coordinator.core import validate as coordinator_rules
from coordinator.core.errors import InvalidRequest
from whimbrel import validate

BAD_NAMES = ["../etc", ".hidden", "..", "vm/1", "vm-1\n", "", "-vm", "Vm-1", "a" * 64]
BAD_MIGRATION_IDS = ["../m", ".m", "-m", "m/1", "m-1\n", "", "m" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_vm_and_host_names_are_refused_on_both_sides(name: str) -> None:
    with pytest.raises(validate.Invalid, match="is invalid"):
        validate.check_name("VM", name)
    with pytest.raises(InvalidRequest, match="is invalid"):
        coordinator_rules.check_name("host", name)


@pytest.mark.parametrize("migration_id", BAD_MIGRATION_IDS)
def test_bad_migration_ids_are_refused_on_both_sides(migration_id: str) -> None:
    with pytest.raises(validate.Invalid, match="is invalid"):
        validate.check_migration_id(migration_id)
    with pytest.raises(InvalidRequest, match="is invalid"):
        coordinator_rules.check_migration_id(migration_id)


@pytest.mark.parametrize("name", ["vm-1", "a", "host-b", "a" * 63])
def test_good_names_pass(name: str) -> None:
    validate.check_name("VM", name)


@pytest.mark.parametrize("migration_id", ["m-1", "m-0123abcd.retry_2", "M1", "9"])
def test_good_migration_ids_pass(migration_id: str) -> None:
    validate.check_migration_id(migration_id)
