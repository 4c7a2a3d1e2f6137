"""Archives a client uploads (a DICOM series as .zip or .tar.gz for a session), unpacked only inside their folder.

``shutil.unpack_archive``, which MONAI Label uses, writes a tar member named ``../x`` or ``/x`` where it says and
follows the links a tar carries ("tar slip"). Here every member is checked before anything is written: a plain
relative path of regular files and folders, no ``..``, no absolute path, no link, device or FIFO, and at most
``MAX_MEMBERS`` members and ``MAX_UNPACKED_BYTES`` bytes unpacked (a small archive may claim terabytes). Then tar
members are extracted with tarfile's ``data`` filter as a second line of defence, zip members by zipfile, which
sanitises names itself.
"""

from __future__ import annotations

import os
import pathlib
import stat
import tarfile
import zipfile

from lib.errors import InvalidInput

MAX_MEMBERS = 10_000  # a DICOM series of 10,000 single-frame files
MAX_UNPACKED_BYTES = 8 << 30
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member(name: str, archive: str) -> None:
    path = pathlib.PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise InvalidInput(f"archive {archive!r} holds the member {name!r}, which points outside its folder")


def _check_totals(count: int, size: int, archive: str) -> None:
    if count > MAX_MEMBERS:
        raise InvalidInput(f"archive {archive!r} holds more than {MAX_MEMBERS} members")
    if size > MAX_UNPACKED_BYTES:
        raise InvalidInput(f"archive {archive!r} unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB")


def extract(path: str, folder: str, archive: str | None = None) -> None:
    """Unpack the archive at ``path`` into ``folder`` after checking every member (see the module doc); ``archive``
    names it in messages (the client's file name)."""
    archive = archive or os.path.basename(path)
    if zipfile.is_zipfile(path):
        _extract_zip(path, folder, archive)
    elif tarfile.is_tarfile(path):
        _extract_tar(path, folder, archive)
    else:
        raise InvalidInput(f"{archive!r} is not a zip or tar archive")


def _extract_zip(path: str, folder: str, archive: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            _check_totals(len(members), sum(m.file_size for m in members), archive)
            for member in members:
                _check_member(member.filename, archive)
                kind = stat.S_IFMT(member.external_attr >> 16)  # 0 when the archiver stored no Unix mode
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise InvalidInput(f"archive {archive!r} holds {member.filename!r}, which is not a regular file")
            zf.extractall(folder)
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as e:
        raise InvalidInput(f"cannot unpack {archive!r}: {e}") from e


def _extract_tar(path: str, folder: str, archive: str) -> None:
    try:
        with tarfile.open(path) as tf:
            count = size = 0
            for member in tf:  # streamed: the member count is checked before a huge index is built
                count += 1
                size += member.size
                _check_totals(count, size, archive)
                _check_member(member.name, archive)
                if not (member.isreg() or member.isdir()):
                    raise InvalidInput(f"archive {archive!r} holds {member.name!r}, which is a link or device, not a regular file")
            tf.extractall(folder, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InvalidInput(f"cannot unpack {archive!r}: {e}") from e
