"""moto_server for benchmarks, with ranged GETs served like S3 serves them: in time proportional to
the range. Stock moto reads and copies the whole object for every ranged GET, which makes reading a
2 GB tar in 8 MB ranges quadratic and would measure moto, not the client. Tests use stock moto.

    python -m bench.moto_ranged -H 127.0.0.1 -p PORT      (the arguments of moto_server)
"""
from __future__ import annotations

import re
import sys
from urllib.parse import urlparse

from moto import server
from moto.s3.responses import S3Response

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_key_response = S3Response.key_response


def _ranged_key_response(self, request, full_url: str, headers):
    match = _RANGE.fullmatch(request.headers.get("range", ""))
    if request.method != "GET" or match is None or urlparse(full_url).query:
        return _key_response(self, request, full_url, headers)
    self.setup_class(request, full_url, headers)
    try:
        key, not_modified = self._get_key()
    except Exception:   # missing key, conditions: moto's own answer
        return _key_response(self, request, full_url, headers)
    begin, end = int(match.group(1)), min(int(match.group(2)), key.size - 1)
    if not_modified or begin > end:
        return _key_response(self, request, full_url, headers)
    with key.lock:
        key._value_buffer.seek(begin)
        content = key._value_buffer.read(end - begin + 1)
    answer = {**key.response_dict, "content-range": f"bytes {begin}-{end}/{key.size}",
              "content-length": str(len(content)), "Accept-Ranges": "bytes"}
    return 206, answer, content


S3Response.key_response = _ranged_key_response

if __name__ == "__main__":
    sys.exit(server.main(sys.argv[1:]))
