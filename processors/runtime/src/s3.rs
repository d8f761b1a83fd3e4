//! A minimal client of an S3-compatible object store: PUT and GET of whole objects, HEAD and
//! create of the bucket. Path-style URLs (`{endpoint}/{bucket}/{key}`), signed with AWS
//! Signature Version 4 (header-based, signed payload), over plain `reqwest`. Enough for task
//! snapshots; nothing else (no multipart, no listing).

use std::time::Duration;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
#[error("s3: {0}")]
pub struct S3Error(String);

/// Where the store is and who we are to it.
#[derive(Clone)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:19000` (a path prefix is allowed).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Extra trusted CAs for an https endpoint (beside the system's).
    pub ca_roots: Vec<reqwest::Certificate>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[redacted]")
            .finish()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// HMAC-SHA256 (RFC 2104): `H((K ^ opad) || H((K ^ ipad) || m))`, 64-byte blocks.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// URI-encodes `s` the way SigV4 wants it: every byte but `A-Z a-z 0-9 - . _ ~` as `%XY`
/// (upper-case hex); `/` kept when `keep_slash` (paths), encoded otherwise (query parts).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One request as SigV4 sees it.
pub struct SignRequest<'a> {
    pub method: &'a str,
    /// The path exactly as sent, already URI-encoded (e.g. `/bucket/test%24file.text`).
    pub encoded_path: &'a str,
    /// Query parameters, not encoded.
    pub query: &'a [(&'a str, &'a str)],
    /// Every header to sign (at least `host`, `x-amz-date`, `x-amz-content-sha256`).
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the body.
    pub payload_hash: &'a str,
}

/// AWS Signature Version 4 for one service in one region.
#[derive(Clone)]
pub struct Signer {
    pub access_key_id: String,
    secret_access_key: String,
    pub region: String,
    pub service: String,
}

impl Signer {
    pub fn new(access_key_id: &str, secret_access_key: &str, region: &str, service: &str) -> Signer {
        Signer {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            region: region.into(),
            service: service.into(),
        }
    }

    /// The canonical request and the signed-headers list.
    pub fn canonical_request(req: &SignRequest<'_>) -> (String, String) {
        let mut query: Vec<(String, String)> = req.query.iter().map(|(k, v)| (uri_encode(k, false), uri_encode(v, false))).collect();
        query.sort();
        let query = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let mut headers: Vec<(String, String)> =
            req.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.split_whitespace().collect::<Vec<_>>().join(" "))).collect();
        headers.sort();
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
        let path = if req.encoded_path.is_empty() { "/" } else { req.encoded_path };
        (format!("{}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{}", req.method, req.payload_hash), signed)
    }

    /// `AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hex(sha256(canonical request))}`.
    pub fn string_to_sign(&self, amz_date: &str, canonical_request: &str) -> String {
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{}\n{}", self.scope(amz_date), sha256_hex(canonical_request.as_bytes()))
    }

    fn scope(&self, amz_date: &str) -> String {
        format!("{}/{}/{}/aws4_request", &amz_date[..8.min(amz_date.len())], self.region, self.service)
    }

    /// The hex signature of `string_to_sign` with the key derived for the request's day.
    pub fn signature(&self, amz_date: &str, string_to_sign: &str) -> String {
        let k_date = hmac_sha256(format!("AWS4{}", self.secret_access_key).as_bytes(), &amz_date.as_bytes()[..8.min(amz_date.len())]);
        let k_region = hmac_sha256(&k_date, self.region.as_bytes());
        let k_service = hmac_sha256(&k_region, self.service.as_bytes());
        let k_signing = hmac_sha256(&k_service, b"aws4_request");
        hex::encode(hmac_sha256(&k_signing, string_to_sign.as_bytes()))
    }

    /// The `Authorization` header value for `req` at `amz_date` (`YYYYMMDDTHHMMSSZ`).
    pub fn authorization(&self, amz_date: &str, req: &SignRequest<'_>) -> String {
        let (canonical, signed) = Signer::canonical_request(req);
        let sig = self.signature(amz_date, &self.string_to_sign(amz_date, &canonical));
        format!("AWS4-HMAC-SHA256 Credential={}/{},SignedHeaders={signed},Signature={sig}", self.access_key_id, self.scope(amz_date))
    }
}

/// The client: one bucket of one S3-compatible store.
#[derive(Clone)]
pub struct S3Client {
    http: reqwest::Client,
    endpoint: String,
    bucket: String,
    signer: Signer,
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Client")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.signer.region)
            .finish()
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> S3Error + '_ {
    move |e| S3Error(format!("{what}: {e}"))
}

impl S3Client {
    pub fn new(s: &S3Settings) -> Result<S3Client, S3Error> {
        reqwest::Url::parse(&s.endpoint).map_err(err("s3.endpoint"))?;
        if s.bucket.is_empty() || s.bucket.contains('/') {
            return Err(S3Error(format!("s3.bucket `{}` is not a bucket name", s.bucket)));
        }
        let mut http = reqwest::Client::builder();
        for root in &s.ca_roots {
            http = http.add_root_certificate(root.clone());
        }
        let http = http
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(err("building the HTTP client"))?;
        Ok(S3Client {
            http,
            endpoint: s.endpoint.trim_end_matches('/').to_owned(),
            bucket: s.bucket.clone(),
            signer: Signer::new(&s.access_key_id, &s.secret_access_key, &s.region, "s3"),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Sends one signed request to `/{bucket}/{key}` (`key` empty: the bucket itself).
    async fn send(&self, method: reqwest::Method, key: &str, body: Vec<u8>) -> Result<reqwest::Response, S3Error> {
        let path = if key.is_empty() { format!("/{}", self.bucket) } else { format!("/{}/{key}", self.bucket) };
        let url = reqwest::Url::parse(&format!("{}{}", self.endpoint, uri_encode(&path, true))).map_err(err("object URL"))?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(S3Error(format!("s3.endpoint {} has no host", self.endpoint))),
        };
        let payload_hash = sha256_hex(&body);
        let amz_date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        let headers = [("host", host.as_str()), ("x-amz-content-sha256", payload_hash.as_str()), ("x-amz-date", amz_date.as_str())];
        let auth = self.signer.authorization(
            &amz_date,
            &SignRequest { method: method.as_str(), encoded_path: url.path(), query: &[], headers: &headers, payload_hash: &payload_hash },
        );
        let what = format!("{method} {path}");
        let mut req = self.http.request(method, url).header("authorization", auth);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        // With the causes: "error sending request" alone hides a refused certificate or a
        // refused connection.
        req.body(body).send().await.map_err(|e| {
            let mut text = format!("{what}: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            S3Error(text)
        })
    }

    async fn failure(what: &str, resp: reqwest::Response) -> S3Error {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        S3Error(format!("{what}: HTTP {status}: {}", body.chars().take(400).collect::<String>()))
    }

    /// Writes (or replaces) object `key`.
    pub async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), S3Error> {
        let resp = self.send(reqwest::Method::PUT, key, body).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(S3Client::failure(&format!("PUT {key}"), resp).await)
        }
    }

    /// Reads object `key`; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let resp = self.send(reqwest::Method::GET, key, Vec::new()).await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(resp.bytes().await.map_err(err(&format!("GET {key}")))?.to_vec())),
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            _ => Err(S3Client::failure(&format!("GET {key}"), resp).await),
        }
    }

    /// Deletes object `key` (deleting one that is not there succeeds, as in S3).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let resp = self.send(reqwest::Method::DELETE, key, Vec::new()).await?;
        if resp.status().is_success() || resp.status() == reqwest::StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(S3Client::failure(&format!("DELETE {key}"), resp).await)
        }
    }

    pub async fn bucket_exists(&self) -> Result<bool, S3Error> {
        let resp = self.send(reqwest::Method::HEAD, "", Vec::new()).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            s => Err(S3Error(format!("HEAD bucket {}: HTTP {s}", self.bucket))),
        }
    }

    /// Creates the bucket unless it exists (a concurrent creation by someone else is fine).
    pub async fn ensure_bucket(&self) -> Result<(), S3Error> {
        if self.bucket_exists().await? {
            return Ok(());
        }
        let body = if self.signer.region == "us-east-1" {
            Vec::new()
        } else {
            format!(r#"<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>"#, self.signer.region).into_bytes()
        };
        let resp = self.send(reqwest::Method::PUT, "", body).await?;
        if resp.status().is_success() || resp.status() == reqwest::StatusCode::CONFLICT {
            Ok(())
        } else {
            Err(S3Client::failure(&format!("creating bucket {}", self.bucket), resp).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const DATE: &str = "20130524T000000Z";

    /// The credentials of the examples in AWS's "Signature Calculations for the Authorization
    /// Header" page of the S3 API reference (sig-v4-header-based-auth).
    fn example() -> Signer {
        Signer::new("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1", "s3")
    }

    fn signature_of(auth: &str) -> &str {
        auth.rsplit("Signature=").next().unwrap()
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test cases 1, 2 and 6 (a key longer than the block).
        assert_eq!(hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex::encode(hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    /// AWS's "GET Object" example: `GET /test.txt` with `Range: bytes=0-9`.
    #[test]
    fn the_aws_get_object_example() {
        let headers =
            [("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9"), ("x-amz-content-sha256", EMPTY), ("x-amz-date", DATE)];
        let req = SignRequest { method: "GET", encoded_path: "/test.txt", query: &[], headers: &headers, payload_hash: EMPTY };
        let (canonical, signed) = Signer::canonical_request(&req);
        assert_eq!(
            canonical,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\nx-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\nx-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(signed, "host;range;x-amz-content-sha256;x-amz-date");
        assert_eq!(
            example().authorization(DATE, &req),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// AWS's "PUT Object" example: a key with `$` (encoded in the path), a `Date` and an
    /// `x-amz-storage-class` header, and a signed body.
    #[test]
    fn the_aws_put_object_example() {
        let body_hash = sha256_hex(b"Welcome to Amazon S3.");
        assert_eq!(body_hash, "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072");
        let path = uri_encode("/test$file.text", true);
        assert_eq!(path, "/test%24file.text");
        let headers = [
            ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-content-sha256", body_hash.as_str()),
            ("x-amz-date", DATE),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ];
        let req = SignRequest { method: "PUT", encoded_path: &path, query: &[], headers: &headers, payload_hash: &body_hash };
        assert_eq!(signature_of(&example().authorization(DATE, &req)), "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd");
    }

    /// AWS's "GET Bucket Lifecycle" and "Get Bucket (List Objects)" examples: query strings,
    /// one parameter without a value, parameters sorted.
    #[test]
    fn the_aws_bucket_examples_with_query_strings() {
        let headers = [("Host", "examplebucket.s3.amazonaws.com"), ("x-amz-content-sha256", EMPTY), ("x-amz-date", DATE)];
        let lifecycle =
            SignRequest { method: "GET", encoded_path: "/", query: &[("lifecycle", "")], headers: &headers, payload_hash: EMPTY };
        assert_eq!(
            signature_of(&example().authorization(DATE, &lifecycle)),
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
        );
        let list = SignRequest {
            method: "GET",
            encoded_path: "/",
            query: &[("prefix", "J"), ("max-keys", "2")],
            headers: &headers,
            payload_hash: EMPTY,
        };
        assert_eq!(signature_of(&example().authorization(DATE, &list)), "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7");
    }

    #[test]
    fn keys_are_encoded_but_slashes_kept_in_paths() {
        assert_eq!(
            uri_encode("/b/snapshots/it_1.x/rollup_day/p0/000000000001-000000000002.snap", true),
            "/b/snapshots/it_1.x/rollup_day/p0/000000000001-000000000002.snap"
        );
        assert_eq!(uri_encode("a b/ü+=", true), "a%20b/%C3%BC%2B%3D");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
    }

    #[test]
    fn the_secret_never_prints() {
        let s = S3Settings {
            endpoint: "http://x".into(),
            bucket: "b".into(),
            region: "r".into(),
            access_key_id: "id".into(),
            secret_access_key: "hush".into(),
            ca_roots: Vec::new(),
        };
        assert!(!format!("{s:?}").contains("hush"));
        assert!(!format!("{:?}", S3Client::new(&s).unwrap()).contains("hush"));
    }
}
