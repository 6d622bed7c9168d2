"""The proxy's CA, and the bundle agents trust: the system roots plus our CA.

mitmproxy keeps its CA in its `confdir` (`mitmproxy-ca.pem`, key and certificate); we point
`confdir` at `certs_dir`, so a company CA dropped there under that name is used instead.
The bundle lets one SSL_CERT_FILE serve both intercepted provider hosts and every host that
passes through untouched.
"""

from pathlib import Path

from mitmproxy.certs import CertStore

from agentkeys.private import private_folder

CA_BASENAME = "mitmproxy"
BUNDLE_NAME = "agentkeys-ca-bundle.pem"
SYSTEM_ROOTS = [Path("/etc/ssl/certs/ca-certificates.crt"), Path("/etc/pki/tls/certs/ca-bundle.crt")]


def ca_cert_path(certs_dir: Path) -> Path:
    return certs_dir / f"{CA_BASENAME}-ca-cert.pem"


def bundle_path(certs_dir: Path) -> Path:
    return certs_dir / BUNDLE_NAME


def system_roots() -> str:
    for path in SYSTEM_ROOTS:
        if path.exists():
            return path.read_text()
    import certifi  # installed with mitmproxy; the fallback where the OS has no bundle

    return Path(certifi.where()).read_text()


def ensure_ca(certs_dir: Path) -> Path:
    """Create the CA if there is none, (re)write the bundle, and return the bundle's path."""
    private_folder(certs_dir)
    CertStore.from_store(certs_dir, CA_BASENAME, 2048)
    bundle = bundle_path(certs_dir)
    bundle.write_text(system_roots().rstrip("\n") + "\n" + ca_cert_path(certs_dir).read_text())
    return bundle


def agent_environment(certs_dir: Path, proxy_url: str) -> dict[str, str]:
    """The variables an agent needs to go through the proxy and trust it."""
    bundle = str(bundle_path(certs_dir))
    return {
        "HTTPS_PROXY": proxy_url,
        "SSL_CERT_FILE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "CURL_CA_BUNDLE": bundle,  # curl reads neither of the two above
        "NODE_EXTRA_CA_CERTS": str(ca_cert_path(certs_dir)),
    }
