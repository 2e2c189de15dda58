"""The testbed's Entra ID side: one tenant, the VM's managed identities and their vault roles.

The default set has two identities. ``system`` is the VM's system-assigned identity (IMDS picks
it when a token request names no client_id/msi_res_id/object_id) and holds "Key Vault Crypto
Officer" and "Key Vault Crypto Service Release User" on the vault. ``noroles`` is a user-assigned
identity, selected by its client_id, with no roles at all. The set is persisted as JSON
(``<state>/identities.json``) so that other processes can read the client ids.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = "identities.json"

CRYPTO_OFFICER = "Key Vault Crypto Officer"
CRYPTO_USER = "Key Vault Crypto User"
RELEASE_USER = "Key Vault Crypto Service Release User"
ADMINISTRATOR = "Key Vault Administrator"
ROLES = (ADMINISTRATOR, CRYPTO_OFFICER, CRYPTO_USER, RELEASE_USER)


@dataclass(frozen=True)
class Identity:
    name: str  # a short handle: "system", "noroles"
    client_id: str
    object_id: str
    principal_name: str  # the display name Entra shows
    resource_id: str  # what IMDS takes as msi_res_id and puts in xms_mirid
    system_assigned: bool
    roles: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"roles": list(self.roles)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identity:
        unknown = [r for r in data.get("roles", []) if r not in ROLES]
        if unknown:
            raise ValueError(f"identity {data.get('name')!r}: unknown role(s) {unknown}")
        return cls(**(data | {"roles": tuple(data.get("roles", ()))}))


@dataclass(frozen=True)
class Identities:
    tenant_id: str
    subscription_id: str
    resource_group: str
    vm_name: str
    members: tuple[Identity, ...]
    path: Path | None = field(default=None, compare=False)  # where it was loaded from / saved

    @classmethod
    def create(
        cls,
        *,
        vm_name: str = "confinfer-vm",
        resource_group: str = "confinfer-rg",
        tenant_id: str | None = None,
    ) -> Identities:
        tenant = tenant_id or str(uuid.uuid4())
        sub = str(uuid.uuid4())
        rg_id = f"/subscriptions/{sub}/resourcegroups/{resource_group}"
        system = Identity(
            name="system",
            client_id=str(uuid.uuid4()),
            object_id=str(uuid.uuid4()),
            principal_name=vm_name,
            resource_id=f"{rg_id}/providers/Microsoft.Compute/virtualMachines/{vm_name}",
            system_assigned=True,
            roles=(CRYPTO_OFFICER, RELEASE_USER),
        )
        noroles = Identity(
            name="noroles",
            client_id=str(uuid.uuid4()),
            object_id=str(uuid.uuid4()),
            principal_name="confinfer-noroles",
            resource_id=(
                f"{rg_id}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"
                "confinfer-noroles"
            ),
            system_assigned=False,
            roles=(),
        )
        return cls(tenant, sub, resource_group, vm_name, (system, noroles))

    @property
    def default(self) -> Identity:
        """The system-assigned identity."""
        return next(i for i in self.members if i.system_assigned)

    def named(self, name: str) -> Identity:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)

    def select(
        self,
        *,
        client_id: str | None = None,
        object_id: str | None = None,
        msi_res_id: str | None = None,
    ) -> Identity | None:
        """The identity an IMDS token request names; the default one when it names none."""
        if client_id is None and object_id is None and msi_res_id is None:
            return self.default
        for member in self.members:
            if client_id is not None and member.client_id.lower() == client_id.lower():
                return member
            if object_id is not None and member.object_id.lower() == object_id.lower():
                return member
            if msi_res_id is not None and member.resource_id.lower() == msi_res_id.lower():
                return member
        return None

    def by_object_id(self, object_id: str) -> Identity | None:
        return next((m for m in self.members if m.object_id.lower() == object_id.lower()), None)

    @property
    def issuer(self) -> str:
        """The v1 access-token issuer of the tenant."""
        return f"https://sts.windows.net/{self.tenant_id}/"

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "subscription_id": self.subscription_id,
            "resource_group": self.resource_group,
            "vm_name": self.vm_name,
            "identities": [m.to_json() for m in self.members],
        }

    def save(self, state_dir: Path) -> Identities:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / FILE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return Identities(
            self.tenant_id,
            self.subscription_id,
            self.resource_group,
            self.vm_name,
            self.members,
            path,
        )

    @classmethod
    def load(cls, state_dir: Path) -> Identities:
        path = state_dir / FILE_NAME
        data = json.loads(path.read_text(encoding="utf-8"))
        members = tuple(Identity.from_json(m) for m in data["identities"])
        if sum(m.system_assigned for m in members) != 1:
            raise ValueError(f"{path}: expected exactly one system-assigned identity")
        return cls(
            data["tenant_id"],
            data["subscription_id"],
            data["resource_group"],
            data["vm_name"],
            members,
            path,
        )

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Identities:
        if (state_dir / FILE_NAME).exists():
            return cls.load(state_dir)
        return cls.create().save(state_dir)
