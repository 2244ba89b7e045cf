"""The hospital's PACS, from the data owner's side: find, retrieve and store DICOM objects.

Modules in dependency order:

- ``config``  ``PacsConfig`` (host, port, AE titles, timeout, optional TLS) from flags or the
              ``[pacs]`` table of a TOML file.
- ``dimse``   DIMSE with pynetdicom: C-ECHO, C-FIND (study root), C-GET into a folder (one
              sub-folder per series), C-STORE of files; every failure is one ``PeerError``
              line naming the PACS (``AET@host:port``) and what it answered.
- ``dicomweb`` the same four calls over DICOMweb with dicomweb-client (QIDO-RS, WADO-RS,
              STOW-RS), for a PACS named by URL.

Only the data owner talks to the PACS; images never go to the model owner or the dealer
except as secret shares inside a secure session.
"""

from __future__ import annotations
