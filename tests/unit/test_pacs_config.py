"""Where the PACS is: flags and the [pacs] table of a TOML file, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from privmed.errors import ConfigError, PeerError
from privmed.pacs.config import PacsConfig, load_pacs_config, parse_address
from privmed.pacs.dicomweb import DicomwebConfig


def test_address_and_toml_table_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "session.toml").write_text(
        '[data_owner]\nhost = "x"\n\n[pacs]\nhost = "pacs.local"\nport = 11112\naet = "HOSPITALPACS"\n'
        'calling_aet = "PRIVMED1"\ntimeout = 12\ntls_ca = "ca.pem"\n'
    )
    cfg = load_pacs_config(tmp_path / "session.toml")
    assert cfg == PacsConfig("pacs.local", 11112, "HOSPITALPACS", "PRIVMED1", 12.0, tmp_path / "ca.pem")
    assert cfg.name == "HOSPITALPACS@pacs.local:11112"
    assert parse_address("127.0.0.1:4242") == ("127.0.0.1", 4242)
    assert parse_address("[::1]:104") == ("::1", 104)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[other]\n", r"no \[pacs\] table"),
        ('[pacs]\nhost = "h"\n', r"\[pacs\] needs host and port"),
        ('[pacs]\nhost = "h"\nport = 1\nfoo = 2\n', r"\[pacs\] has unknown keys foo"),
        ('[pacs]\nhost = "h"\nport = 70000\n', r"PACS port 70000: expected 1-65535"),
        ('[pacs]\nhost = "h"\nport = 1\naet = "A_TITLE_LONGER_THAN_16"\n', r"PACS aet 'A_TITLE_LONGER_THAN_16': expected 1-16 ASCII"),
        ("[pacs\n", r"not valid TOML"),
    ],
)
def test_bad_pacs_tables_are_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_pacs_config(tmp_path / "p.toml")


def test_bad_addresses_and_urls_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"--pacs 'pacs': expected HOST:PORT"):
        parse_address("pacs")
    with pytest.raises(ConfigError, match=r"--dicomweb 'pacs:8042': expected an http:// or https:// URL"):
        DicomwebConfig("pacs:8042")


def test_unusable_tls_files_name_the_pacs(tmp_path: Path) -> None:
    from privmed.pacs.dimse import _tls_args

    cfg = PacsConfig("127.0.0.1", 4242, tls_ca=tmp_path / "missing-ca.pem")
    with pytest.raises(PeerError, match=r"PACS ORTHANC@127\.0\.0\.1:4242: TLS files unusable"):
        _tls_args(cfg)
