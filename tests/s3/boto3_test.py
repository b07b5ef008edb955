"""The S3 gateway driven by boto3, the way applications use it. Run by tests/s3.rs against a
real cluster and gateway; every check raises on failure (the exit status is what counts).

Environment: S3_ENDPOINT, S3_GC_ENDPOINT (a gateway that expires uploads after 2 s),
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, CLI_BUCKET, CLI_KEY and CLI_CONTENT (an object the test put with
`cairn put`, to read back here).
"""

import base64
import concurrent.futures
import datetime
import hashlib
import os
import time
import urllib.error
import urllib.request

import boto3
import botocore
import botocore.auth
from botocore.config import Config

EP = os.environ["S3_ENDPOINT"]
GC_EP = os.environ["S3_GC_ENDPOINT"]
AK = os.environ["AWS_ACCESS_KEY_ID"]
SK = os.environ["AWS_SECRET_ACCESS_KEY"]
MIB = 1 << 20


def client(endpoint=EP, key=AK, secret=SK):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


s3 = client()


def check(name):
    print("ok", name, flush=True)


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"expected {code}, got {got}: {e}"
        return e
    raise AssertionError(f"expected {code}, but the call succeeded")


def md5(b):
    return hashlib.md5(b).hexdigest()


def etag(r):
    return r["ETag"].strip('"')


# ---------------------------------------------------------------- buckets
s3.create_bucket(Bucket="alpha")
expect_error("BucketAlreadyOwnedByYou", s3.create_bucket, Bucket="alpha")
assert "alpha" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
s3.head_bucket(Bucket="alpha")
expect_error("404", s3.head_bucket, Bucket="missing-bucket")
expect_error("NoSuchBucket", s3.list_objects_v2, Bucket="missing-bucket")
expect_error("NoSuchBucket", s3.put_object, Bucket="missing-bucket", Key="k", Body=b"x")
s3.create_bucket(Bucket="scratch")
s3.put_object(Bucket="scratch", Key="one", Body=b"1")
expect_error("BucketNotEmpty", s3.delete_bucket, Bucket="scratch")
s3.delete_object(Bucket="scratch", Key="one")
s3.delete_bucket(Bucket="scratch")
assert "scratch" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
check("buckets")

# ---------------------------------------------------------------- put, get, head
body = os.urandom(9 * MIB + 12345)
r = s3.put_object(
    Bucket="alpha", Key="dir/sub/obj.bin", Body=body, ContentType="application/x-test", Metadata={"color": "blue"}
)
assert etag(r) == md5(body), (etag(r), md5(body))
g = s3.get_object(Bucket="alpha", Key="dir/sub/obj.bin")
assert g["Body"].read() == body
assert g["ContentType"] == "application/x-test"
assert g["Metadata"] == {"color": "blue"}, g["Metadata"]
assert etag(g) == md5(body)
h = s3.head_object(Bucket="alpha", Key="dir/sub/obj.bin")
assert h["ContentLength"] == len(body) and etag(h) == md5(body)
expect_error("NoSuchKey", s3.get_object, Bucket="alpha", Key="dir/nothing")
expect_error("404", s3.head_object, Bucket="alpha", Key="dir/nothing")
s3.put_object(Bucket="alpha", Key="empty", Body=b"")
assert s3.get_object(Bucket="alpha", Key="empty")["Body"].read() == b""
# Overwrite: the new content and metadata replace the old at once.
s3.put_object(Bucket="alpha", Key="over", Body=b"first", Metadata={"v": "1"})
s3.put_object(Bucket="alpha", Key="over", Body=b"second")
g = s3.get_object(Bucket="alpha", Key="over")
assert g["Body"].read() == b"second" and g["Metadata"] == {}
check("put/get/head")

ok_md5 = base64.b64encode(hashlib.md5(b"abc").digest()).decode()
s3.put_object(Bucket="alpha", Key="md5-ok", Body=b"abc", ContentMD5=ok_md5)
bad_md5 = base64.b64encode(hashlib.md5(b"abd").digest()).decode()
expect_error("BadDigest", s3.put_object, Bucket="alpha", Key="md5-bad", Body=b"abc", ContentMD5=bad_md5)
expect_error("NoSuchKey", s3.get_object, Bucket="alpha", Key="md5-bad")
expect_error("InvalidDigest", s3.put_object, Bucket="alpha", Key="md5-bad", Body=b"abc", ContentMD5="bm90LW1kNQ==")
check("content-md5")

# ---------------------------------------------------------------- ranges and conditions
def ranged(spec):
    return s3.get_object(Bucket="alpha", Key="dir/sub/obj.bin", Range=spec)


r = ranged("bytes=100-199")
assert r["Body"].read() == body[100:200] and r["ContentRange"] == f"bytes 100-199/{len(body)}"
assert ranged("bytes=-10")["Body"].read() == body[-10:]
assert ranged(f"bytes={len(body) - 5}-")["Body"].read() == body[-5:]
# Across a chunk boundary (4 MiB).
assert ranged(f"bytes={4 * MIB - 3}-{4 * MIB + 3}")["Body"].read() == body[4 * MIB - 3 : 4 * MIB + 4]
expect_error("InvalidRange", ranged, f"bytes={len(body) + 10}-")
s3.put_object(Bucket="alpha", Key="empty", Body=b"")
expect_error("InvalidRange", s3.get_object, Bucket="alpha", Key="empty", Range="bytes=-5")
s3.delete_object(Bucket="alpha", Key="empty")
check("ranges")

tag = md5(body)
s3.get_object(Bucket="alpha", Key="dir/sub/obj.bin", IfMatch=f'"{tag}"')
expect_error("PreconditionFailed", s3.get_object, Bucket="alpha", Key="dir/sub/obj.bin", IfMatch='"00000000"')
expect_error("304", s3.get_object, Bucket="alpha", Key="dir/sub/obj.bin", IfNoneMatch=f'"{tag}"')
future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
past = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
expect_error("304", s3.get_object, Bucket="alpha", Key="dir/sub/obj.bin", IfModifiedSince=future)
s3.get_object(Bucket="alpha", Key="dir/sub/obj.bin", IfModifiedSince=past)
expect_error("PreconditionFailed", s3.get_object, Bucket="alpha", Key="dir/sub/obj.bin", IfUnmodifiedSince=past)
check("conditional get")

# ---------------------------------------------------------------- keys that cannot be paths
expect_error("InvalidArgument", s3.put_object, Bucket="alpha", Key="a//b", Body=b"x")
expect_error("KeyTooLongError", s3.put_object, Bucket="alpha", Key="x" * 300, Body=b"x")
# An object cannot also be a prefix of other keys: dir/sub/obj.bin is a file.
expect_error("InvalidArgument", s3.put_object, Bucket="alpha", Key="dir/sub/obj.bin/child", Body=b"x")
check("keys that cannot be paths")

# ---------------------------------------------------------------- copy
c = s3.copy_object(Bucket="alpha", Key="copies/c.bin", CopySource={"Bucket": "alpha", "Key": "dir/sub/obj.bin"})
assert etag(c["CopyObjectResult"]) == tag
g = s3.get_object(Bucket="alpha", Key="copies/c.bin")
assert g["Body"].read() == body and g["Metadata"] == {"color": "blue"} and g["ContentType"] == "application/x-test"
s3.copy_object(
    Bucket="alpha",
    Key="copies/r.bin",
    CopySource={"Bucket": "alpha", "Key": "dir/sub/obj.bin"},
    MetadataDirective="REPLACE",
    Metadata={"shape": "round"},
    ContentType="text/x-new",
)
h = s3.head_object(Bucket="alpha", Key="copies/r.bin")
assert h["Metadata"] == {"shape": "round"} and h["ContentType"] == "text/x-new" and etag(h) == tag
expect_error(
    "InvalidRequest", s3.copy_object, Bucket="alpha", Key="copies/c.bin", CopySource={"Bucket": "alpha", "Key": "copies/c.bin"}
)
expect_error(
    "PreconditionFailed",
    s3.copy_object,
    Bucket="alpha",
    Key="copies/x.bin",
    CopySource={"Bucket": "alpha", "Key": "dir/sub/obj.bin"},
    CopySourceIfMatch='"0000"',
)
expect_error("NoSuchKey", s3.copy_object, Bucket="alpha", Key="copies/y", CopySource={"Bucket": "alpha", "Key": "nope"})
check("copy")

# ---------------------------------------------------------------- delete
s3.delete_object(Bucket="alpha", Key="copies/r.bin")
expect_error("NoSuchKey", s3.get_object, Bucket="alpha", Key="copies/r.bin")
s3.delete_object(Bucket="alpha", Key="copies/never-there")  # no error, as in S3
for k in ["del/a", "del/b", "del/c/d"]:
    s3.put_object(Bucket="alpha", Key=k, Body=b"x")
r = s3.delete_objects(Bucket="alpha", Delete={"Objects": [{"Key": "del/a"}, {"Key": "del/b"}, {"Key": "del/c/d"}]})
assert sorted(d["Key"] for d in r["Deleted"]) == ["del/a", "del/b", "del/c/d"], r
assert not r.get("Errors"), r
# Deleting the last key under a prefix leaves no empty "folder" behind.
assert "CommonPrefixes" not in s3.list_objects_v2(Bucket="alpha", Prefix="del/", Delimiter="/"), "del/ lingers"
assert s3.list_objects_v2(Bucket="alpha", Prefix="del")["KeyCount"] == 0
check("delete")

# ---------------------------------------------------------------- listing
s3.create_bucket(Bucket="many")
keys = [f"d{i % 20:02}/k{i:04}" for i in range(2000)] + [f"top{i:02}" for i in range(15)]


def put_small(k):
    client_ = s3
    client_.put_object(Bucket="many", Key=k, Body=k.encode())


with concurrent.futures.ThreadPoolExecutor(16) as pool:
    list(pool.map(put_small, keys))
expected = sorted(keys, key=lambda k: k.encode())

got = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="many", PaginationConfig={"PageSize": 333}):
    assert page["KeyCount"] <= 333
    got += [o["Key"] for o in page.get("Contents", [])]
assert got == expected, "V2 listing differs"
got = []
for page in s3.get_paginator("list_objects").paginate(Bucket="many", PaginationConfig={"PageSize": 450}):
    got += [o["Key"] for o in page.get("Contents", [])]
assert got == expected, "V1 listing differs"

prefixes, tops = [], []
for page in s3.get_paginator("list_objects_v2").paginate(
    Bucket="many", Delimiter="/", PaginationConfig={"PageSize": 7}
):
    prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    tops += [o["Key"] for o in page.get("Contents", [])]
assert prefixes == [f"d{i:02}/" for i in range(20)], prefixes
assert tops == [f"top{i:02}" for i in range(15)], tops
r = s3.list_objects_v2(Bucket="many", Prefix="d07/k01")
assert [o["Key"] for o in r["Contents"]] == [f"d07/k{i:04}" for i in range(2000) if i % 20 == 7 and f"{i:04}".startswith("01")]
r = s3.list_objects_v2(Bucket="many", StartAfter="d19/k1999", MaxKeys=3)
assert [o["Key"] for o in r["Contents"]] == ["top00", "top01", "top02"] and r["IsTruncated"]
r = s3.list_objects_v2(Bucket="many", Prefix="d03/", Delimiter="/", MaxKeys=1000)
assert r["KeyCount"] == 100 and not r["IsTruncated"]
assert all(o["ETag"].strip('"') == md5(o["Key"].encode()) for o in r["Contents"])

# Bytewise order across directories: '-' < '/' < '0'.
for k in ["ord/a0", "ord/a/b", "ord/a-b"]:
    s3.put_object(Bucket="alpha", Key=k, Body=b"o")
r = s3.list_objects_v2(Bucket="alpha", Prefix="ord/")
assert [o["Key"] for o in r["Contents"]] == ["ord/a-b", "ord/a/b", "ord/a0"], r["Contents"]
# Keys that need URL encoding in listings (boto3 asks for encoding-type=url and decodes).
odd = "odd/sp ace+plus%25&amp;<x>.txt"
s3.put_object(Bucket="alpha", Key=odd, Body=b"odd")
assert [o["Key"] for o in s3.list_objects_v2(Bucket="alpha", Prefix="odd/")["Contents"]] == [odd]
assert s3.get_object(Bucket="alpha", Key=odd)["Body"].read() == b"odd"
check("listing 2,015 keys")

# ---------------------------------------------------------------- multipart
key = "big/multipart.bin"
up = s3.create_multipart_upload(Bucket="alpha", Key=key, ContentType="application/x-big", Metadata={"m": "1"})
uid = up["UploadId"]
assert uid in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket="alpha")["Uploads"]]
parts, whole = [], hashlib.sha256()
digests = b""
for n in range(1, 21):
    data = os.urandom(5 * MIB)
    whole.update(data)
    digests += hashlib.md5(data).digest()
    r = s3.upload_part(Bucket="alpha", Key=key, UploadId=uid, PartNumber=n, Body=data)
    assert etag(r) == md5(data)
    parts.append({"PartNumber": n, "ETag": r["ETag"]})
listed = []
for page in s3.get_paginator("list_parts").paginate(
    Bucket="alpha", Key=key, UploadId=uid, PaginationConfig={"PageSize": 7}
):
    listed += [(p["PartNumber"], p["ETag"], p["Size"]) for p in page.get("Parts", [])]
assert [p[0] for p in listed] == list(range(1, 21)) and all(p[2] == 5 * MIB for p in listed)
# A page of 0 parts or uploads is empty and last (a client paging on would loop for ever).
z = s3.list_parts(Bucket="alpha", Key=key, UploadId=uid, MaxParts=0)
assert not z["IsTruncated"] and not z.get("Parts"), z
z = s3.list_multipart_uploads(Bucket="alpha", MaxUploads=0)
assert not z["IsTruncated"] and not z.get("Uploads"), z
expect_error(
    "InvalidPartOrder",
    s3.complete_multipart_upload,
    Bucket="alpha",
    Key=key,
    UploadId=uid,
    MultipartUpload={"Parts": [parts[1], parts[0]]},
)
# A part with another ETag, or listed without one.
for listed in ({"PartNumber": 1, "ETag": '"0123456789abcdef0123456789abcdef"'}, {"PartNumber": 1}):
    expect_error(
        "InvalidPart",
        s3.complete_multipart_upload,
        Bucket="alpha",
        Key=key,
        UploadId=uid,
        MultipartUpload={"Parts": [listed]},
    )
r = s3.complete_multipart_upload(Bucket="alpha", Key=key, UploadId=uid, MultipartUpload={"Parts": parts})
assert etag(r) == hashlib.md5(digests).hexdigest() + "-20", etag(r)
g = s3.get_object(Bucket="alpha", Key=key)
got = hashlib.sha256()
for piece in iter(lambda: g["Body"].read(MIB), b""):
    got.update(piece)
assert got.digest() == whole.digest(), "multipart content differs"
assert g["ContentLength"] == 100 * MIB and g["ContentType"] == "application/x-big" and g["Metadata"] == {"m": "1"}
assert etag(s3.head_object(Bucket="alpha", Key=key)) == etag(r)
assert uid not in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket="alpha").get("Uploads", [])]
expect_error("NoSuchUpload", s3.list_parts, Bucket="alpha", Key=key, UploadId=uid)
# A retried completion (its first answer lost) gets the same answer; for anything else, and
# for another key, the upload is gone.
again = s3.complete_multipart_upload(Bucket="alpha", Key=key, UploadId=uid, MultipartUpload={"Parts": parts})
assert etag(again) == etag(r), etag(again)
expect_error(
    "NoSuchUpload",
    s3.complete_multipart_upload,
    Bucket="alpha",
    Key="big/other",
    UploadId=uid,
    MultipartUpload={"Parts": parts},
)
expect_error("NoSuchUpload", s3.upload_part, Bucket="alpha", Key=key, UploadId=uid, PartNumber=1, Body=b"late")
expect_error("NoSuchUpload", s3.abort_multipart_upload, Bucket="alpha", Key=key, UploadId=uid)
assert etag(s3.head_object(Bucket="alpha", Key=key)) == etag(r)

small = s3.create_multipart_upload(Bucket="alpha", Key="big/small-parts")["UploadId"]
p1 = s3.upload_part(Bucket="alpha", Key="big/small-parts", UploadId=small, PartNumber=1, Body=b"tiny")
p2 = s3.upload_part(Bucket="alpha", Key="big/small-parts", UploadId=small, PartNumber=2, Body=b"tail")
expect_error(
    "EntityTooSmall",
    s3.complete_multipart_upload,
    Bucket="alpha",
    Key="big/small-parts",
    UploadId=small,
    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p1["ETag"]}, {"PartNumber": 2, "ETag": p2["ETag"]}]},
)
s3.abort_multipart_upload(Bucket="alpha", Key="big/small-parts", UploadId=small)
expect_error("NoSuchUpload", s3.list_parts, Bucket="alpha", Key="big/small-parts", UploadId=small)
expect_error("NoSuchKey", s3.get_object, Bucket="alpha", Key="big/small-parts")
check("multipart 100 MiB in 5 MiB parts")

gc = client(GC_EP)
abandoned = gc.create_multipart_upload(Bucket="alpha", Key="big/abandoned")["UploadId"]
gc.upload_part(Bucket="alpha", Key="big/abandoned", UploadId=abandoned, PartNumber=1, Body=b"left behind")
deadline = time.time() + 30
while True:
    try:
        gc.list_parts(Bucket="alpha", Key="big/abandoned", UploadId=abandoned)
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == "NoSuchUpload", e
        break
    assert time.time() < deadline, "the abandoned upload was not collected"
    time.sleep(0.5)
check("abandoned uploads collected")

# ---------------------------------------------------------------- auth
expect_error("SignatureDoesNotMatch", client(secret="x" * 40).list_buckets)
expect_error("InvalidAccessKeyId", client(key="CKNOSUCHKEY000000000").list_buckets)
try:
    urllib.request.urlopen(f"{EP}/alpha/over")
    raise AssertionError("an anonymous request was served")
except urllib.error.HTTPError as e:
    assert e.code == 403 and b"<Code>AccessDenied</Code>" in e.read()

url = s3.generate_presigned_url("get_object", Params={"Bucket": "alpha", "Key": "over"}, ExpiresIn=300)
assert urllib.request.urlopen(url).read() == b"second"
tampered = url.replace("over", "md5-ok")
try:
    urllib.request.urlopen(tampered)
    raise AssertionError("a tampered presigned URL was served")
except urllib.error.HTTPError as e:
    assert e.code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in e.read()
short = s3.generate_presigned_url("get_object", Params={"Bucket": "alpha", "Key": "over"}, ExpiresIn=1)
time.sleep(2.5)
try:
    urllib.request.urlopen(short)
    raise AssertionError("an expired presigned URL was served")
except urllib.error.HTTPError as e:
    assert e.code == 403 and b"<Code>AccessDenied</Code>" in e.read()

# A request signed with a clock an hour behind.
real_datetime = datetime.datetime


class SkewedClock(real_datetime):
    @classmethod
    def utcnow(cls):
        return real_datetime.utcnow() - datetime.timedelta(hours=1)

    @classmethod
    def now(cls, tz=None):
        return real_datetime.now(tz) - datetime.timedelta(hours=1)


botocore.auth.datetime.datetime = SkewedClock
try:
    expect_error("RequestTimeTooSkewed", client().list_buckets)
finally:
    botocore.auth.datetime.datetime = real_datetime
check("auth: bad signature, unknown key, anonymous, presigned, expired, clock skew")

# ---------------------------------------------------------------- raw requests
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def raw(method, path, headers=None, body=b""):
    """A request signed with SigV4 by botocore, sent by urllib: (status, body)."""
    req = AWSRequest(method=method, url=EP + path, data=body, headers=headers or {})
    S3SigV4Auth(Credentials(AK, SK), "s3", "us-east-1").add_auth(req)
    r = urllib.request.Request(EP + path, data=body or None, method=method, headers=dict(req.headers.items()))
    try:
        with urllib.request.urlopen(r) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# Create-only PUT (If-None-Match: *), as lock files use it.
status, _ = raw("PUT", "/alpha/lock/once", {"If-None-Match": "*"}, b"first")
assert status == 200, status
status, text = raw("PUT", "/alpha/lock/once", {"If-None-Match": "*"}, b"second")
assert status == 412 and b"PreconditionFailed" in text, (status, text)
assert s3.get_object(Bucket="alpha", Key="lock/once")["Body"].read() == b"first"
status, text = raw("PUT", "/alpha/lock/once", {"If-Match": '"abc"'}, b"third")
assert status == 501, (status, text)
# Signature Version 2 headers are refused (whatever the signature); presigned URLs (V2 from boto3 by default) are
# valid for at most 7 days.
import email.utils
import hmac

date = email.utils.formatdate(usegmt=True)
v2 = base64.b64encode(hmac.new(SK.encode(), f"GET\n\n\n{date}\n/alpha/over".encode(), hashlib.sha1).digest()).decode()
try:
    urllib.request.urlopen(
        urllib.request.Request(f"{EP}/alpha/over", headers={"Date": date, "Authorization": f"AWS {AK}:{v2}"})
    )
    raise AssertionError("a Signature V2 request was served")
except urllib.error.HTTPError as e:
    text = e.read()
    assert e.code == 403 and b"Version 2" in text, (e.code, text)
week = s3.generate_presigned_url("get_object", Params={"Bucket": "alpha", "Key": "over"}, ExpiresIn=8 * 24 * 3600)
try:
    urllib.request.urlopen(week)
    raise AssertionError("a presigned URL valid for 8 days was served")
except urllib.error.HTTPError as e:
    assert e.code in (400, 403), e.code
# The lifetime is checked under a percent-encoded parameter name too (s3s decodes names).
stretched = week.replace("Expires=", "Expire%73=")
assert stretched != week
try:
    urllib.request.urlopen(stretched)
    raise AssertionError("a presigned URL valid for 8 days was served under an encoded parameter name")
except urllib.error.HTTPError as e:
    assert e.code in (400, 403), e.code
check("conditional writes, V2 signatures, presigned URL lifetime")


# POST uploads (browser forms) are not served, even with a policy signed by a valid key, and
# store nothing.
def post_form(form, content):
    b = "cairnformboundary"
    data = b"".join(
        f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in form["fields"].items()
    )
    data += f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'.encode()
    data += content + f"\r\n--{b}--\r\n".encode()
    req = urllib.request.Request(
        form["url"], data=data, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={b}"}
    )
    try:
        urllib.request.urlopen(req)
        raise AssertionError("a POST upload was served")
    except urllib.error.HTTPError as e:
        return e.code, e.read()


form = s3.generate_presigned_post("alpha", "posted")
code, text = post_form(form, b"")
assert code == 501 and b"NotImplemented" in text, (code, text)
code, text = post_form(form, b"x" * 1000)
assert code in (400, 501), (code, text)
expect_error("404", s3.head_object, Bucket="alpha", Key="posted")
check("POST uploads refused")

# "name/" is a directory ("folder" object), "name" a file: neither answers for the other.
s3.put_object(Bucket="alpha", Key="folder/", Body=b"")
h = s3.head_object(Bucket="alpha", Key="folder/")
assert h["ContentLength"] == 0 and etag(h) == md5(b"")
s3.put_object(Bucket="alpha", Key="keep", Body=b"kept")
s3.delete_object(Bucket="alpha", Key="keep/")
assert s3.get_object(Bucket="alpha", Key="keep")["Body"].read() == b"kept"
expect_error("404", s3.head_object, Bucket="alpha", Key="keep/")
s3.delete_object(Bucket="alpha", Key="folder")
s3.head_object(Bucket="alpha", Key="folder/")
s3.delete_object(Bucket="alpha", Key="folder/")
expect_error("404", s3.head_object, Bucket="alpha", Key="folder/")
check("directory keys")

# ---------------------------------------------------------------- the same namespace
assert s3.get_object(Bucket=os.environ["CLI_BUCKET"], Key=os.environ["CLI_KEY"])["Body"].read() == os.environ["CLI_CONTENT"].encode()
s3.put_object(Bucket=os.environ["CLI_BUCKET"], Key="from-s3/hello.txt", Body=b"written through S3\n")
check("objects shared with the client library")
print("ALL OK", flush=True)
