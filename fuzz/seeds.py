#!/usr/bin/env python3
"""Writes the hand-made seed corpus under fuzz/corpus/<target>/ (run from anywhere; idempotent).

Tokens are dated around the targets' fixed "now" (fuzz/src/lib.rs: NOW, 2026-11-25T08:00:00Z), so
that the valid ones stay valid.
"""
import base64
import json
import os

NOW = 1_795_593_600
POD = "0b5e3c2a-1111-4222-8333-444455556666"
OTHER_POD = "11111111-2222-4333-8444-555555555555"
NODE = "ip-10-0-0-1.us-west-2.compute.internal"
CID = "4f3c2b1a" * 8
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(pod=POD, sa="cart", ns="shop", jti="8f9a0c1e", node=NODE, **over):
    c = {
        "aud": ["pods.eks.amazonaws.com"],
        "exp": NOW + 23 * 3600,
        "iat": NOW - 3600,
        "nbf": NOW - 3600,
        "iss": "https://oidc.eks.us-west-2.amazonaws.com/id/5C2B6E1F0A9D8C7B6A5F4E3D2C1B0A99",
        "jti": jti,
        "sub": f"system:serviceaccount:{ns}:{sa}",
        "kubernetes.io": {
            "namespace": ns,
            "node": {"name": node, "uid": "7d1c9a52-0e3b-4f4d-9b8e-2a6c5d4e3f21"},
            "pod": {"name": f"{sa}-7d9f8c6b5-x2x4z", "uid": pod},
            "serviceaccount": {"name": sa, "uid": "3e2d1c0b-aaaa-4bbb-8ccc-dddddddddddd"},
        },
    }
    c.update(over)
    return c


def token(c) -> str:
    header = b64(json.dumps({"alg": "RS256", "kid": "2f6d5c3b", "typ": "JWT"}).encode())
    payload = b64(json.dumps(c, separators=(",", ":")).encode())
    return f"{header}.{payload}.{b64(b'not-a-real-signature-but-long-enough-to-look-like-one')}"


GOOD = token(claims())
TOKENS = {
    "valid": GOOD,
    "aud-string": token(claims(aud="pods.eks.amazonaws.com")),
    "aud-wrong": token(claims(aud="sts.amazonaws.com")),
    "expired": token(claims(exp=NOW - 3600)),
    "not-yet-valid": token(claims(nbf=NOW + 3600)),
    "no-kubernetes-claim": token({"aud": "pods.eks.amazonaws.com", "exp": NOW + 3600}),
    "other-pod": token(claims(pod=OTHER_POD)),
    "other-node": token(claims(node="ip-10-9-9-9.us-west-2.compute.internal")),
    "upstream-invalid-token": token(claims(jti="upstream:400:InvalidTokenException")),
    "upstream-unavailable": token(claims(jti="upstream:503:ServiceUnavailableException")),
    "upstream-throttled": token(claims(jti="upstream:429:ThrottlingException")),
    "upstream-not-found": token(claims(jti="upstream:404:ResourceNotFoundException")),
    "exp-huge": token(claims(exp=2**63 - 1)),
    "nbf-tiny": token(claims(nbf=-(2**63))),
    "padded": GOOD.split(".")[0] + "." + GOOD.split(".")[1] + "==." + GOOD.split(".")[2],
}


def write(target: str, name: str, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def request(token=None, host="169.254.170.23", path="/v1/credentials", method="GET", extra=""):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if token is not None:
        lines.append(f"Authorization: {token}")
    return "\r\n".join(lines) + "\r\n" + extra + "\r\n"


# token: whole tokens, and payloads (the target reads its input both ways).
for name, t in TOKENS.items():
    write("token", name, t)
write("token", "payload-valid", json.dumps(claims()))
write("token", "payload-minimal", '{"exp":1795600000,"aud":"pods.eks.amazonaws.com"}')
write("token", "payload-aud-null", '{"exp":1795600000,"aud":null,"nbf":null}')
write("token", "not-a-jwt", "a.b")
write("token", "four-parts", "a.b.c.d")

# http_validation: Host, newline, Authorization.
for name, (host, t) in {
    "ipv4": ("169.254.170.23", GOOD),
    "ipv4-port": ("169.254.170.23:80", GOOD),
    "ipv6": ("[fd00:ec2::23]", GOOD),
    "ipv6-port": ("[fd00:ec2::23]:80", GOOD),
    "ipv6-bare": ("fd00:ec2::23", GOOD),
    "ecs-host": ("169.254.170.2", GOOD),
    "dns-name": ("localhost:80", GOOD),
    "no-token": ("169.254.170.23", ""),
    "garbage-token": ("169.254.170.23", "garbage"),
    "expired": ("169.254.170.23", TOKENS["expired"]),
    "other-pod": ("169.254.170.23", TOKENS["other-pod"]),
    "other-node": ("169.254.170.23", TOKENS["other-node"]),
    "upstream-error": ("169.254.170.23", TOKENS["upstream-invalid-token"]),
    "bearer": ("169.254.170.23", "Bearer " + GOOD),
}.items():
    write("http_validation", name, f"{host}\n{t}")
write("http_validation", "no-authorization", "169.254.170.23:80")

# request: a mode byte (binding = b % 3: off, audit, enforce; caller = b / 3 % 3: none, pod,
# no pod), then what a client sends.
OFF_ANON, AUDIT_POD, ENFORCE_POD, ENFORCE_ANON = b"\x00", b"\x04", b"\x05", b"\x02"
for name, (mode, raw) in {
    "botocore": (OFF_ANON, request(GOOD, extra="Accept-Encoding: identity\r\nUser-Agent: Botocore/1.35.0\r\n")),
    "java": (OFF_ANON, request(GOOD, host="169.254.170.23:80", extra="Accept: application/json\r\nUser-Agent: aws-sdk-java/2.29.0\r\nConnection: keep-alive\r\n")),
    "ipv6": (OFF_ANON, request(GOOD, host="[fd00:ec2::23]")),
    "keep-alive-cache-hit": (OFF_ANON, request(GOOD) + request(GOOD) + request(GOOD)),
    "enforce-match": (ENFORCE_POD, request(GOOD)),
    "enforce-other-pod": (ENFORCE_POD, request(TOKENS["other-pod"])),
    "enforce-unattributed": (ENFORCE_ANON, request(GOOD)),
    "rotation-fallback": (AUDIT_POD, request(GOOD) + request(TOKENS["upstream-unavailable"])),
    "upstream-errors": (OFF_ANON, request(TOKENS["upstream-invalid-token"]) + request(TOKENS["upstream-throttled"]) + request(TOKENS["upstream-not-found"])),
    "no-token": (OFF_ANON, request()),
    "expired": (OFF_ANON, request(TOKENS["expired"])),
    "wrong-host": (OFF_ANON, request(GOOD, host="example.com")),
    "not-found": (OFF_ANON, request(GOOD, path="/latest/meta-data/")),
    "post": (OFF_ANON, request(GOOD, method="POST", extra="Content-Length: 5\r\n") + "hello"),
    "head": (OFF_ANON, request(GOOD, method="HEAD")),
    "http10": (OFF_ANON, request(GOOD).replace("HTTP/1.1", "HTTP/1.0", 1)),
    "absolute-form": (OFF_ANON, request(GOOD, path="http://169.254.170.23/v1/credentials")),
    "chunked": (OFF_ANON, request(GOOD, extra="Transfer-Encoding: chunked\r\n") + "5\r\nhello\r\n0\r\n\r\n" + request(GOOD)),
    "expect-continue": (OFF_ANON, request(GOOD, extra="Content-Length: 3\r\nExpect: 100-continue\r\n") + "abc"),
    "incomplete-head": (OFF_ANON, "GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\nAuthor"),
    "huge-header": (OFF_ANON, request(GOOD, extra="X-Pad: " + "a" * 20000 + "\r\n")),
    "bad-version": (OFF_ANON, "GET /v1/credentials HTTP/2.0\r\n\r\n"),
    "obs-text-token": (OFF_ANON, b"GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\nAuthorization: \xff\xfe\r\n\r\n"),
}.items():
    write("request", name, mode + (raw if isinstance(raw, bytes) else raw.encode()))

# cgroup_path: attach point, kubelet --cgroup-root (or empty), path[, suffix].
UID_ = POD.replace("-", "_")
for name, (attach, kubelet, path) in {
    "systemd-burstable": ("/", "", f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"),
    "systemd-guaranteed": ("/", "", f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
    "systemd-crio": ("/", "", f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"),
    "systemd-conmon": ("/", "", f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope"),
    "systemd-pod-level": ("/", "", f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
    "cgroupfs-burstable": ("/", "", f"/kubepods/burstable/pod{POD}/{CID}"),
    "cgroupfs-guaranteed": ("/", "", f"/kubepods/pod{POD}/{CID}"),
    "cgroupfs-docker": ("/", "", f"/kubepods/besteffort/pod{POD}/docker-{CID}"),
    "static-pod": ("/", "", "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b3a7e1f4c2d9e8a6b5c4d3e2f1a0b9c.slice"),
    "nested": ("/", "", f"/kubepods/burstable/pod{POD}/{CID}/worker/kubepods/pod{OTHER_POD}/x"),
    "kind-kubelet-root": ("/", "/kubelet", f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"),
    "kubelet-root-cgroupfs": ("/", "/kubelet", f"/kubelet/kubepods/pod{POD}/{CID}"),
    "kubelet-root-two-levels": ("/", "/a/b-c", f"/a.slice/a-b_c.slice/a-b_c-kubepods.slice/a-b_c-kubepods-pod{UID_}.slice"),
    "attach-point": ("/e2e-1-2", "", f"/e2e-1-2/kubepods/burstable/pod{POD}/{CID}"),
    "user-slice": ("/", "", f"/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods/burstable/pod{POD}/x"),
    "system-slice": ("/", "", "/system.slice/containerd.service"),
}.items():
    write("cgroup_path", name, f"{attach}\n{kubelet}\n{path}")

# upstream_reply: status, X-Amzn-ErrorType (or empty), body, as EKS Auth sends them.
OK_BODY = {
    "subject": {"namespace": "shop", "serviceAccount": "cart"},
    "audience": "pods.eks.amazonaws.com",
    "podIdentityAssociation": {
        "associationArn": "arn:aws:eks:us-west-2:111122223333:podidentityassociation/prod/a-abcdefghijklmnop1",
        "associationId": "a-abcdefghijklmnop1",
    },
    "assumedRoleUser": {
        "arn": "arn:aws:sts::111122223333:assumed-role/cart-role/eks-prod-cart-7d9-abc",
        "assumeRoleId": "AROAEXAMPLEID:eks-prod-cart-7d9-abc",
    },
    "credentials": {
        "sessionToken": "IQoJb3JpZ2luX2VjEXAMPLE",
        "secretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "accessKeyId": "ASIAEXAMPLE123456789",
        "expiration": NOW + 6 * 3600,
    },
}
missing = dict(OK_BODY)
del missing["credentials"]
fractional = json.loads(json.dumps(OK_BODY))
fractional["credentials"]["expiration"] = NOW + 0.5
for name, (status, kind, body) in {
    "ok": (200, "", json.dumps(OK_BODY)),
    "ok-missing-credentials": (200, "", json.dumps(missing)),
    "ok-fractional-expiration": (200, "", json.dumps(fractional)),
    "ok-empty": (200, "", ""),
    "invalid-token": (400, "InvalidTokenException", '{"message":"The token is invalid."}'),
    "invalid-token-type-in-body": (400, "", '{"__type":"com.amazonaws.eksauth#InvalidTokenException","message":"bad signature"}'),
    "expired-token": (400, "ExpiredTokenException", '{"message":"Token expired"}'),
    "access-denied": (400, "AccessDeniedException", '{"message":"denied"}'),
    "invalid-parameter": (400, "InvalidParameterException", '{"message":"cluster name"}'),
    "not-found": (404, "ResourceNotFoundException", '{"message":"no association"}'),
    "throttled": (429, "ThrottlingException", '{"message":"Rate exceeded"}'),
    "internal": (500, "InternalServerException", '{"message":"oops"}'),
    "unavailable": (503, "ServiceUnavailableException", ""),
    "html-from-a-proxy": (502, "", "<html><body>Bad Gateway</body></html>"),
    "redirect": (302, "", ""),
}.items():
    write("upstream_reply", name, f"{status}\n{kind}\n{body}")

# audit_record: bytes the target turns into records (strings, numbers, choices).
write("audit_record", "ascii", b"2026-11-25T08:00:00.000Z" * 4 + b"\x01" * 64)
write("audit_record", "control-and-unicode", "a\nb\r\"c\\\u2028\u2029\x00\x1f\x7f\u00e9\U0001F600".encode() * 8)
write("audit_record", "zeros", bytes(256))
write("audit_record", "ones", bytes([0xFF]) * 256)
