"""moto's S3 server on 127.0.0.1 for the tests that keep run directories, checkpoints or
tables on S3: started once per module, with the AWS variables s3fs (and every child
process the test starts) reads pointed at it, and put back afterwards."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def moto_s3(bucket: str, endpoint_var: str = "AWS_ENDPOINT_URL"):
    """Yields (s3fs filesystem, the environment variables that reach the server), with
    `bucket` made (moto keeps buckets per process, across servers: an existing one is fine).
    `endpoint_var` names the server: AWS_ENDPOINT_URL (every AWS service), or the
    S3-only AWS_ENDPOINT_URL_S3."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           endpoint_var: f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = s3fs.S3FileSystem()
        fs.makedirs(bucket, exist_ok=True)
        yield fs, env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
