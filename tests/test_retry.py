"""Only transient failures are retried: a wrong password or a corrupt file is final."""

from __future__ import annotations

import pytest
import redis
from prefect.states import Failed

from tasks.common.retry import retry_transient
from tasks.redis.rdb import RdbError
from tasks.redis.save import SaveTimeout
from tasks.redis.server import RedisAccessError, RedisUnreachable
from tasks.store.s3 import S3Error, S3Unreachable


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (RedisUnreachable("down"), True),
        (S3Unreachable("down"), True),
        (redis.ConnectionError("reset"), True),
        (TimeoutError("slow"), True),
        (RedisAccessError("wrong password"), False),
        (redis.AuthenticationError("wrong password"), False),
        (S3Error("no such bucket"), False),
        (RdbError("checksum mismatch"), False),
        (SaveTimeout("deadline"), False),
        (ValueError("bad input"), False),
    ],
)
def test_retry_condition(error: Exception, retried: bool) -> None:
    assert retry_transient(None, None, Failed(data=error)) is retried
