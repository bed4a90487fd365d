"""Certificates and keys for the local cluster, made once and reused from the state directory.

One self-signed CA signs everything: the apiserver's serving cert, a client cert per identity
(admin, controller-manager, scheduler, each node, the apiserver's own kubelet client) and the node
agent's serving cert. Identities are the ones a kubeadm cluster uses, so the Node authorizer,
NodeRestriction and RBAC see exactly what they would in production.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


class ClusterPKI:
    """Files under `<state>/pki/`; every getter creates what is missing and reuses what is there."""

    def __init__(self, directory: Path, service_cidr: str = "10.96.0.0/12"):
        self.dir = Path(directory)
        self.service_ip = next(ipaddress.ip_network(service_cidr).hosts())

    @property
    def ca(self) -> CertPair:
        return self._ca("ca", "qlora-localcluster-ca")

    @property
    def front_proxy_ca(self) -> CertPair:
        """A CA of its own, as kubeadm does: the apiserver trusts X-Remote-User headers only from
        clients it signed, so it must not be the CA that signs ordinary client certs."""
        return self._ca("front-proxy-ca", "qlora-localcluster-front-proxy-ca")

    def front_proxy_client(self) -> CertPair:
        """The apiserver's identity towards aggregated API servers (metrics-server and the like)."""
        return self._leaf("front-proxy-client", "front-proxy-client", [], issuer=self.front_proxy_ca)

    def _ca(self, file_stem: str, common_name: str) -> CertPair:
        pair = CertPair(self.dir / f"{file_stem}.crt", self.dir / f"{file_stem}.key")
        if not (pair.cert.exists() and pair.key.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            cert = (
                _builder(name, name, key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True, key_cert_sign=True, crl_sign=True,
                        content_commitment=False, key_encipherment=False, data_encipherment=False,
                        key_agreement=False, encipher_only=False, decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256())
            )
            _write(pair, cert, key)
        return pair

    def apiserver_serving(self) -> CertPair:
        names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"]
        ips = [ipaddress.ip_address("127.0.0.1"), self.service_ip]
        return self._leaf("apiserver", "kube-apiserver", [], server=True, dns=names, ips=ips)

    def admin(self) -> CertPair:
        return self._leaf("admin", "kubernetes-admin", ["system:masters"])

    def controller_manager(self) -> CertPair:
        return self._leaf("kube-controller-manager", "system:kube-controller-manager", [])

    def scheduler(self) -> CertPair:
        return self._leaf("kube-scheduler", "system:kube-scheduler", [])

    def node_client(self, node_name: str) -> CertPair:
        """The identity the Node authorizer and NodeRestriction admission recognise as that node."""
        return self._leaf(f"node-{node_name}", f"system:node:{node_name}", ["system:nodes"])

    def kubelet_serving(self) -> CertPair:
        """Serving cert for the node agents' HTTPS endpoints (logs), all on 127.0.0.1."""
        return self._leaf("kubelet-serving", "qlora-node-agent", [], server=True, dns=["localhost"],
                          ips=[ipaddress.ip_address("127.0.0.1")])

    def apiserver_kubelet_client(self) -> CertPair:
        # system:masters so the node agent may authorize log requests by group alone.
        return self._leaf("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["system:masters"])

    def service_account_keys(self) -> CertPair:
        """RSA pair that signs/verifies ServiceAccount tokens (`cert` holds the public key)."""
        pair = CertPair(self.dir / "sa.pub", self.dir / "sa.key")
        if not (pair.cert.exists() and pair.key.exists()):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.dir.mkdir(parents=True, exist_ok=True)
            pair.key.write_bytes(_key_pem(key))
            pair.key.chmod(0o600)
            pair.cert.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return pair

    def _leaf(self, file_stem: str, common_name: str, organizations: list[str], server: bool = False,
              dns: list[str] = (), ips: list = (), issuer: CertPair | None = None) -> CertPair:
        pair = CertPair(self.dir / f"{file_stem}.crt", self.dir / f"{file_stem}.key")
        if pair.cert.exists() and pair.key.exists():
            return pair
        ca_pair = issuer or self.ca
        ca_cert = x509.load_pem_x509_certificate(ca_pair.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_pair.key.read_bytes(), password=None)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
            + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
            )
        )
        if dns or ips:
            sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        _write(pair, builder.sign(ca_key, hashes.SHA256()), key)
        return pair


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(pair: CertPair, cert: x509.Certificate, key) -> None:
    pair.cert.parent.mkdir(parents=True, exist_ok=True)
    pair.key.write_bytes(_key_pem(key))
    pair.key.chmod(0o600)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
