#!/usr/bin/env python3
"""Run s3vol's local moto S3 server and bootstrap its test credentials.

Used by scripts/s3-server.sh; not meant to be called by hand.

  s3_server_setup.py serve HOST PORT
      Runs moto's server (what `moto_server -H HOST -p PORT` runs) with these
      fixes: S3 signatures are checked against the request line as sent
      (_patch_s3_canonical_request), PUT bodies are never parsed as forms
      (_patch_put_form_parsing), and STS web identity behaves as AWS's does
      where s3vol's tests rely on it (_patch_sts_web_identity).

  s3_server_setup.py setup ENDPOINT REGION
      Spends moto's unauthenticated request budget (INITIAL_NO_AUTH_ACTION_COUNT,
      which must be exactly BOOTSTRAP_REQUESTS) on creating an IAM user, an
      access key and an allow-all inline policy, then proves that SigV4 checking
      is on: the new key works for S3 and IAM, a wrong secret and an unknown
      access key are rejected, and that escaped characters in a signed S3
      request line do not break the check. Prints
      "ACCESS_KEY_ID SECRET_ACCESS_KEY".

  s3_server_setup.py check ENDPOINT REGION ACCESS_KEY_ID SECRET_ACCESS_KEY
      Exits 0 if the server answers a signed ListBuckets with that key.

  s3_server_setup.py budget
      Prints BOOTSTRAP_REQUESTS, the INITIAL_NO_AUTH_ACTION_COUNT to start with.

Only boto3 is needed; it comes with moto.
"""

import json
import os
import sys

# The IAM calls made by `setup` before authentication starts. Each one is a
# single HTTP request that moto counts; s3-server.sh starts moto with
# INITIAL_NO_AUTH_ACTION_COUNT set to this number.
BOOTSTRAP_REQUESTS = 3

USER_NAME = "s3vol-test"
POLICY_NAME = "s3vol-allow-all"
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def _isolate_from_caller_environment():
    """Keep the caller's AWS profile, endpoint overrides and proxies out."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith("AWS_") or upper in (
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ):
            del os.environ[name]
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def _client(service, endpoint, region, key_id, secret):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(
            # One HTTP request per call: a retry would spend the budget twice.
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            s3={"addressing_style": "path"},
        ),
    )


def _error_code(call):
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as err:
        return err.response.get("Error", {}).get("Code", "?")
    return None


def setup(endpoint, region):
    # Before the budget is spent moto checks nothing, but boto3 still needs
    # some credentials to sign with (moto routes the request by the service
    # named in the signature's credential scope).
    from botocore.exceptions import ClientError

    iam = _client("iam", endpoint, region, "S3VOLBOOTSTRAP", "bootstrap")
    try:
        iam.create_user(UserName=USER_NAME)  # request 1
        key = iam.create_access_key(UserName=USER_NAME)["AccessKey"]  # request 2
        iam.put_user_policy(  # request 3
            UserName=USER_NAME,
            PolicyName=POLICY_NAME,
            PolicyDocument=json.dumps(ALLOW_ALL),
        )
    except ClientError as err:
        sys.exit(
            f"s3_server_setup: bootstrapping the IAM user failed: {err}\n"
            "(was the server's unauthenticated budget used up by another"
            " client, or is something else listening on this port?)"
        )
    key_id, secret = key["AccessKeyId"], key["SecretAccessKey"]

    # From here on every request is signature-checked.
    s3 = _client("s3", endpoint, region, key_id, secret)
    s3.list_buckets()
    iam = _client("iam", endpoint, region, key_id, secret)
    iam.get_user(UserName=USER_NAME)

    # Signed request line with characters werkzeug decodes (see
    # _patch_s3_canonical_request): must get past the signature check.
    code = _error_code(
        lambda: s3.list_objects_v2(
            Bucket="s3vol-no-such-bucket", Prefix="a+b:c=d é/", Delimiter="/"
        )
    )
    if code != "NoSuchBucket":
        sys.exit(
            "s3_server_setup: a signed request with escaped characters got"
            f" {code!r} instead of NoSuchBucket: the S3 signature fix is not working"
        )

    bad_secret = secret[:-1] + ("y" if secret.endswith("x") else "x")
    wrong_secret = _client("s3", endpoint, region, key_id, bad_secret)
    code = _error_code(wrong_secret.list_buckets)
    if code != "SignatureDoesNotMatch":
        sys.exit(
            f"s3_server_setup: a wrong secret was not rejected (got {code!r}):"
            " SigV4 checking is not on"
        )
    unknown = _client("s3", endpoint, region, "AKIAS3VOLUNKNOWN0000", secret)
    code = _error_code(unknown.list_buckets)
    if code != "InvalidAccessKeyId":
        sys.exit(
            "s3_server_setup: an unknown access key was not rejected"
            f" (got {code!r}): SigV4 checking is not on"
        )

    print(key_id, secret)


def check(endpoint, region, key_id, secret):
    try:
        _client("s3", endpoint, region, key_id, secret).list_buckets()
    except Exception as err:  # noqa: BLE001 - any failure means "not usable"
        print(f"s3_server_setup: saved key does not work: {err}", file=sys.stderr)
        return 1
    return 0


def _canonical_s3_target(raw_target):
    """SigV4 canonical URI and query string of an S3 request target.

    Every path byte but unreserved ones and "/" is percent-encoded once, with
    no path normalisation (S3's rule); query keys and values likewise, "/"
    included, and the pairs sorted. Decoding first makes this independent of
    how the client chose to escape the request line.
    """
    from urllib.parse import quote_from_bytes, unquote_to_bytes, urlsplit

    parts = urlsplit(raw_target.encode("latin-1"))  # WSGI strings hold bytes
    path = quote_from_bytes(unquote_to_bytes(parts.path or b"/"), safe="/")
    pairs = []
    for pair in parts.query.split(b"&") if parts.query else []:
        key, _, value = pair.partition(b"=")
        pairs.append(
            (
                quote_from_bytes(unquote_to_bytes(key), safe=""),
                quote_from_bytes(unquote_to_bytes(value), safe=""),
            )
        )
    query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    return path + ("?" + query if query else "")


def _patch_s3_canonical_request():
    """Make moto check S3 signatures against the request line as sent.

    moto (checked on 5.2.1) rebuilds the canonical request from Flask's
    request.url, in which werkzeug has already decoded part of what clients
    percent-encode (seen in the path: + : = & * ; % \\ and non-ASCII; in the
    query: /). Correctly signed requests for keys such as "a+b" or "é", or a
    ListObjects with delimiter=/, then fail with SignatureDoesNotMatch.
    This uses the raw request target that werkzeug's server keeps in the
    WSGI environ (RAW_URI) instead. Other services (IAM, STS: POST to /)
    are left as they are.
    """
    from flask import has_request_context, request
    from moto.iam.access_control import S3IAMRequest

    original = S3IAMRequest._create_aws_request

    def _create_aws_request(self):
        aws_request = original(self)
        if has_request_context():
            raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
            if raw:
                aws_request.url = _canonical_s3_target(raw)
        return aws_request

    S3IAMRequest._create_aws_request = _create_aws_request


def _patch_put_form_parsing():
    """Keep moto from parsing PUT bodies as HTML forms.

    moto reads every request's form (moto/core/responses.py, setup_class).
    For a PUT whose Content-Type is application/x-www-form-urlencoded or
    multipart/form-data, werkzeug then consumes the body as form fields: moto
    5.2.1 stores an empty object (and answers 200) and turns the field names
    into query parameters. No AWS API sends a form with PUT (form uploads to
    S3 are POSTs), so PUT bodies are left alone and reach moto as bytes.
    """
    from flask import Request

    wants_form = Request.want_form_data_parsed

    def want_form_data_parsed(self):
        return self.method != "PUT" and wants_form.fget(self)

    Request.want_form_data_parsed = property(want_form_data_parsed)


def _jwt_claims(token):
    """The claims of a JWT (its signature is not checked), or None."""
    import base64

    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


def _patch_sts_web_identity():
    """Make STS web identity behave as AWS's where s3vol's tests rely on it.

    moto 5.2.1, unpatched:
     - requires a SigV4 signature on AssumeRoleWithWebIdentity once
       authentication is on (and fails with a 500 without one). AWS takes
       the call unsigned: the token is the credential. It is exempted here.
     - accepts any token for any role, even an expired one or a role that
       does not exist. Here the token must be a JWT (its signature is not
       checked) whose "exp" claim lies in the future (else
       ExpiredTokenException) and the role must exist (else AccessDenied),
       so tests can prove that an expired token is refused.
     - accepts assumed-role credentials forever. Here a request signed with
       them after their Expiration is refused (ExpiredToken, as AWS answers),
       so a client must renew them in time.
    Nothing else changes: the role's policies already apply to its
    assumed-role credentials, and other STS calls are as moto has them.
    """
    import datetime
    import time

    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam import access_control
    from moto.iam.models import iam_backends
    from moto.sts.exceptions import STSClientError
    from moto.sts.models import sts_backends
    from moto.sts.responses import TokenResponse

    from moto.s3.exceptions import S3ClientError

    authenticate = ActionAuthenticatorMixin._authenticate_and_authorize_normal_action

    def _authenticate_and_authorize_normal_action(self, resource="*"):
        if self._get_action() == "AssumeRoleWithWebIdentity":
            return
        return authenticate(self, resource)

    ActionAuthenticatorMixin._authenticate_and_authorize_normal_action = (
        _authenticate_and_authorize_normal_action
    )

    assume = TokenResponse.assume_role_with_web_identity

    def assume_role_with_web_identity(self):
        claims = _jwt_claims(self._get_param("WebIdentityToken") or "")
        if claims is None:
            raise STSClientError(
                "InvalidIdentityToken", "The web identity token is not a JWT"
            )
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp <= time.time():
            raise STSClientError("ExpiredTokenException", "Token expired")
        role_arn = self._get_param("RoleArn") or ""
        backend = iam_backends[self.current_account][self.partition]
        if not any(r.arn == role_arn for r in backend.roles.values()):
            raise STSClientError(
                "AccessDenied",
                "Not authorized to perform sts:AssumeRoleWithWebIdentity",
            )
        return assume(self)

    TokenResponse.assume_role_with_web_identity = assume_role_with_web_identity

    key_init = access_control.AssumedRoleAccessKey.__init__

    def assumed_role_key_init(self, account_id, partition, access_key_id, headers):
        key_init(self, account_id, partition, access_key_id, headers)
        for role in sts_backends[account_id][partition].assumed_roles:
            if role.access_key_id == access_key_id:
                now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                if role.expiration <= now:
                    # S3's error shape: only S3 requests use these keys here.
                    raise S3ClientError(
                        "ExpiredToken", "The provided token has expired."
                    )

    access_control.AssumedRoleAccessKey.__init__ = assumed_role_key_init


def serve(host, port):
    _patch_s3_canonical_request()
    _patch_put_form_parsing()
    _patch_sts_web_identity()
    from moto.server import main as moto_server_main

    moto_server_main(["-H", host, "-p", port])


def main(argv):
    if len(argv) == 3 and argv[0] == "serve":
        serve(argv[1], argv[2])
        return 0
    _isolate_from_caller_environment()
    if len(argv) == 3 and argv[0] == "setup":
        setup(argv[1], argv[2])
        return 0
    if len(argv) == 5 and argv[0] == "check":
        return check(*argv[1:])
    if len(argv) == 1 and argv[0] == "budget":
        print(BOOTSTRAP_REQUESTS)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
