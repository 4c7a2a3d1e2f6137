"""lib/archives.py: an uploaded archive unpacks inside its folder or not at all."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from lib import archives
from lib.errors import InvalidInput


def make_tar(path, *members: tuple[str, str], mode: str = "w:gz") -> str:
    with tarfile.open(path, mode) as archive:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 4
                archive.addfile(info, io.BytesIO(b"data"))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[
                    kind
                ]
                info.linkname = "/etc/hostname"
                archive.addfile(info)
    return str(path)


def test_a_series_unpacks_inside_its_folder(tmp_path):
    path = make_tar(tmp_path / "series.tar.gz", ("series", "dir"), ("series/1.dcm", "file"), ("series/2.dcm", "file"))
    archives.extract(path, str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out" / "series").iterdir()) == ["1.dcm", "2.dcm"]

    with zipfile.ZipFile(tmp_path / "series.zip", "w") as zf:
        zf.writestr("series/1.dcm", b"data")
    archives.extract(str(tmp_path / "series.zip"), str(tmp_path / "zipped"))
    assert (tmp_path / "zipped" / "series" / "1.dcm").read_bytes() == b"data"


@pytest.mark.parametrize(
    "member,kind,message",
    [
        ("../escape", "file", "points outside its folder"),
        ("a/../../escape", "file", "points outside its folder"),
        ("/tmp/escape", "file", "points outside its folder"),
        ("link", "symlink", "is a link or device"),
        ("link", "hardlink", "is a link or device"),
        ("disk", "device", "is a link or device"),
        ("pipe", "fifo", "is a link or device"),
    ],
)
def test_tar_members_that_leave_the_folder_are_refused(tmp_path, member, kind, message):
    path = make_tar(tmp_path / "bad.tar", ("fine.dcm", "file"), (member, kind), mode="w")
    with pytest.raises(InvalidInput, match=message):
        archives.extract(path, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists(), "something was written before the check"


@pytest.mark.parametrize("member", ["../escape", "/abs/escape", "C:/escape"])
def test_zip_members_that_leave_the_folder_are_refused(tmp_path, member):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr(member, b"data")
    with pytest.raises(InvalidInput, match="points outside its folder"):
        archives.extract(str(tmp_path / "bad.zip"), str(tmp_path / "out"))


def test_zip_links_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        link = zipfile.ZipInfo("volume.nii.gz")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/hostname")
    with pytest.raises(InvalidInput, match="not a regular file"):
        archives.extract(str(tmp_path / "link.zip"), str(tmp_path / "out"))


def test_member_count_and_size_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MAX_MEMBERS", 2)
    path = make_tar(tmp_path / "many.tar.gz", *[(f"{i}.dcm", "file") for i in range(3)])
    with pytest.raises(InvalidInput, match="more than 2 members"):
        archives.extract(path, str(tmp_path / "out"))
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 6)
    path = make_tar(tmp_path / "big.tar.gz", ("a", "file"), ("b", "file"))
    with pytest.raises(InvalidInput, match="unpacks to more than"):
        archives.extract(path, str(tmp_path / "out"))


def test_what_is_not_an_archive_is_named(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"plain bytes")
    with pytest.raises(InvalidInput, match="'x.zip' is not a zip or tar archive"):
        archives.extract(str(tmp_path / "x.zip"), str(tmp_path / "out"))
