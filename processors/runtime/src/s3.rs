//! The object store of task snapshots and of the raw archive, through `aws-sdk-s3`: AWS S3 or any
//! S3-compatible store (MinIO, moto, …).
//!
//! - **Credentials**: the configured access key when one is set; otherwise the SDK's default chain
//!   (environment, shared profile files, web identity — IRSA on EKS —, ECS container credentials,
//!   EC2 instance metadata), resolved on first use and refreshed by the SDK before they expire.
//! - **Retries**: the SDK's standard mode (exponential backoff with jitter on throttling, 5xx,
//!   timeouts and refused connections), `max_attempts` attempts per request. A body streamed from
//!   a file is read again for each attempt.
//! - **Bounded memory**: [`put_file`](S3Client::put_file) uploads a file in one request up to
//!   `part_size` and as a multipart upload of `part_size` parts beyond it, each part read from the
//!   file as it is sent; [`get_to_file`](S3Client::get_to_file) writes the body to a file as it
//!   arrives. Neither holds the object in memory.
//! - **TLS** over rustls (ring), with an extra CA bundle for a private CA beside the system's.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
#[error("s3: {text}")]
pub struct S3Error {
    text: String,
    /// The request was answered but its body did not arrive whole (cut off, short): fetching
    /// it again may succeed, unlike a refused request, which the SDK has retried already.
    pub body_cut: bool,
}

fn err(text: String) -> S3Error {
    S3Error { text, body_cut: false }
}

/// The least part of a multipart upload S3 accepts (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// Where the store is and who we are to it.
#[derive(Clone)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:19000`; empty: AWS's own endpoint for `region`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Empty: the SDK's default credential chain (environment, profile, web identity, ECS, IMDS).
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `{endpoint}/{bucket}/{key}` rather than `{bucket}.{endpoint}/{key}` (MinIO, moto).
    pub path_style: bool,
    /// Attempts per request, the first included (1: no retries).
    pub max_attempts: u32,
    /// Files up to this size go in one PUT; larger ones as multipart uploads of parts this size.
    pub part_size: u64,
    /// A PEM bundle of extra trusted CAs for an https endpoint (beside the system's).
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[redacted]")
            .field("path_style", &self.path_style)
            .field("max_attempts", &self.max_attempts)
            .field("part_size", &self.part_size)
            .finish()
    }
}

/// The client: one bucket of one store.
#[derive(Clone)]
pub struct S3Client {
    client: aws_sdk_s3::Client,
    endpoint: String,
    bucket: String,
    part_size: u64,
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Client").field("endpoint", &self.endpoint).field("bucket", &self.bucket).finish()
    }
}

/// The whole cause chain: "dispatch failure" alone hides a refused certificate or connection.
fn failed<E: std::error::Error>(what: &str) -> impl FnOnce(E) -> S3Error + '_ {
    move |e| err(format!("{what}: {}", DisplayErrorContext(&e)))
}

/// The default credential chain, built on first use (building it is async; the client is not).
#[derive(Debug)]
struct DefaultChain {
    region: Region,
    http: aws_sdk_s3::config::SharedHttpClient,
    chain: tokio::sync::OnceCell<aws_config::default_provider::credentials::DefaultCredentialsChain>,
}

impl aws_credential_types::provider::ProvideCredentials for DefaultChain {
    fn provide_credentials<'a>(&'a self) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            let chain = self
                .chain
                .get_or_init(|| async {
                    let conf = aws_config::provider_config::ProviderConfig::default()
                        .with_region(Some(self.region.clone()))
                        .with_http_client(self.http.clone());
                    aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .region(self.region.clone())
                        .configure(conf)
                        .build()
                        .await
                })
                .await;
            aws_credential_types::provider::ProvideCredentials::provide_credentials(chain).await
        })
    }
}

impl S3Client {
    pub fn new(s: &S3Settings) -> Result<S3Client, S3Error> {
        if !s.endpoint.is_empty() {
            let ok = s
                .endpoint
                .split_once("://")
                .is_some_and(|(scheme, rest)| (scheme == "http" || scheme == "https") && !rest.is_empty() && !rest.starts_with('/'));
            if !ok {
                return Err(err(format!("s3.endpoint `{}` is not an http(s) URL with a host", s.endpoint)));
            }
        }
        if s.bucket.is_empty() || s.bucket.contains('/') {
            return Err(err(format!("s3.bucket `{}` is not a bucket name", s.bucket)));
        }
        if s.part_size < MIN_PART_SIZE {
            return Err(err(format!("s3.part_size_mb: parts of {} bytes are below S3's 5 MiB minimum", s.part_size)));
        }
        let mut trust = TrustStore::default();
        if let Some(pem) = &s.ca_pem {
            trust = trust.with_pem_certificate(pem.clone());
        }
        let ctx = TlsContext::builder().with_trust_store(trust).build().map_err(failed("s3.ca_file"))?;
        // HTTP(S)_PROXY / NO_PROXY as every other client of the process honours them (the SDK's
        // client ignores them unless told).
        let proxy = ProxyConfig::from_env();
        let http = aws_smithy_http_client::Builder::new().build_with_connector_fn(move |settings, components| {
            let mut conn = aws_smithy_http_client::Connector::builder().proxy_config(proxy.clone());
            conn.set_connector_settings(settings.cloned());
            if let Some(c) = components {
                conn.set_sleep_impl(c.sleep_impl());
            }
            conn.tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).tls_context(ctx.clone()).build()
        });
        let region = Region::new(s.region.clone());
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(region.clone())
            .http_client(http.clone())
            .force_path_style(s.path_style)
            .retry_config(RetryConfig::standard().with_max_attempts(s.max_attempts.max(1)))
            // A connection is made within 5 s; each attempt (a PUT, a part, a GET's answer) ends
            // within 5 min; a body that stops moving is cut by the SDK's stalled-stream
            // protection (on by default). A snapshot download has its own deadline
            // (snapshot.rs), so no takeover waits without bound.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            )
            // Snapshots carry their own SHA-256 and archive segments are sealed: no extra
            // checksum trailers, which not every S3-compatible store reads.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if !s.endpoint.is_empty() {
            conf = conf.endpoint_url(s.endpoint.trim_end_matches('/'));
        }
        conf = if s.access_key_id.is_empty() {
            conf.credentials_provider(DefaultChain { region, http, chain: Default::default() })
        } else {
            conf.credentials_provider(Credentials::new(&s.access_key_id, &s.secret_access_key, None, None, "vitals-config"))
        };
        Ok(S3Client {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            endpoint: if s.endpoint.is_empty() { format!("aws:{}", s.region) } else { s.endpoint.clone() },
            bucket: s.bucket.clone(),
            part_size: s.part_size,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Writes (or replaces) object `key`.
    pub async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(failed(&format!("PUT {key}")))?;
        Ok(())
    }

    /// Writes (or replaces) object `key` with the file at `path`, streamed from the file: one PUT
    /// up to the part size, a multipart upload beyond it (aborted on failure). Returns its size.
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<u64, S3Error> {
        let size = tokio::fs::metadata(path).await.map_err(|e| err(format!("{}: {e}", path.display())))?.len();
        let part = |offset: u64, len: u64| async move {
            ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(|e| err(format!("reading {}: {e}", path.display())))
        };
        // S3 takes at most 10 000 parts of at most 5 GiB: larger files get larger parts.
        let part_size = self.part_size.max(size.div_ceil(10_000));
        if part_size > 5 << 30 {
            return Err(err(format!("{}: {size} bytes is more than S3 takes in one object", path.display())));
        }
        if size <= part_size {
            let body = part(0, size).await?;
            self.client.put_object().bucket(&self.bucket).key(key).body(body).send().await.map_err(failed(&format!("PUT {key}")))?;
            return Ok(size);
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(failed(&format!("starting the multipart upload of {key}")))?;
        let upload = created.upload_id().ok_or_else(|| err(format!("the multipart upload of {key} has no id")))?.to_owned();
        let sent = async {
            let mut parts = Vec::new();
            let mut offset = 0;
            while offset < size {
                let len = part_size.min(size - offset);
                let number = parts.len() as i32 + 1;
                let done = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload)
                    .part_number(number)
                    .content_length(len as i64)
                    .body(part(offset, len).await?)
                    .send()
                    .await
                    .map_err(failed(&format!("part {number} of {key}")))?;
                parts.push(CompletedPart::builder().part_number(number).set_e_tag(done.e_tag().map(str::to_owned)).build());
                offset += len;
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map_err(failed(&format!("completing the multipart upload of {key}")))?;
            Ok::<_, S3Error>(size)
        }
        .await;
        if sent.is_err() {
            // Best effort: an upload left behind holds storage until the bucket's lifecycle rule
            // (AbortIncompleteMultipartUpload) removes it.
            let _ = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&upload).send().await;
        }
        sent
    }

    /// The answer to a GET of `key`, its body not read yet; `None` when there is no such object.
    async fn open(&self, key: &str) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, S3Error> {
        match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(failed(&format!("GET {key}"))(e)),
        }
    }

    /// Reads object `key`; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let Some(out) = self.open(key).await? else { return Ok(None) };
        Ok(Some(out.body.collect().await.map_err(failed(&format!("GET {key}")))?.into_bytes().to_vec()))
    }

    /// Writes object `key` to a new file at `path` as it arrives, not synced (nothing is left at
    /// `path` on an error). Returns its size; `None` when there is no such object.
    pub async fn get_to_file(&self, key: &str, path: &Path) -> Result<Option<u64>, S3Error> {
        let what = format!("GET {key}");
        let Some(mut out) = self.open(key).await? else { return Ok(None) };
        let expected = out.content_length().and_then(|n| u64::try_from(n).ok());
        let written = async {
            let io = |e: std::io::Error| err(format!("writing {}: {e}", path.display()));
            let mut file = tokio::fs::File::create(path).await.map_err(io)?;
            let mut n = 0u64;
            let cut = |e| S3Error { body_cut: true, ..failed(&what)(e) };
            while let Some(chunk) = out.body.try_next().await.map_err(cut)? {
                file.write_all(&chunk).await.map_err(io)?;
                n += chunk.len() as u64;
            }
            // Not synced (a scratch copy, read back from the page cache; worthless after a
            // crash). tokio's File reports a failed last write on flush.
            file.flush().await.map_err(io)?;
            match expected {
                Some(len) if len != n => Err(S3Error { text: format!("{what}: {n} bytes arrived of {len}"), body_cut: true }),
                _ => Ok(n),
            }
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(path).await;
        }
        written.map(Some)
    }

    /// Deletes object `key` (deleting one that is not there succeeds, as in S3).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.client.delete_object().bucket(&self.bucket).key(key).send().await.map_err(failed(&format!("DELETE {key}")))?;
        Ok(())
    }

    pub async fn bucket_exists(&self) -> Result<bool, S3Error> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
            Err(e) => Err(failed(&format!("HEAD bucket {}", self.bucket))(e)),
        }
    }

    /// Creates the bucket unless it exists (a concurrent creation by someone else is fine).
    pub async fn ensure_bucket(&self) -> Result<(), S3Error> {
        if self.bucket_exists().await? {
            return Ok(());
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        let region = self.client.config().region().map(|r| r.as_ref().to_owned()).unwrap_or_default();
        if region != "us-east-1" && !region.is_empty() {
            use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder().location_constraint(BucketLocationConstraint::from(region.as_str())).build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you()) => Ok(()),
            // Created meanwhile by another instance — or the name is someone else's bucket,
            // which this client cannot use: a HEAD tells which.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 409) => match self.bucket_exists().await {
                Ok(true) => Ok(()),
                _ => Err(failed(&format!("creating bucket {} (the name is taken by another account?)", self.bucket))(e)),
            },
            Err(e) => Err(failed(&format!("creating bucket {}", self.bucket))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> S3Settings {
        S3Settings {
            endpoint: "http://x".into(),
            bucket: "b".into(),
            region: "r".into(),
            access_key_id: "id".into(),
            secret_access_key: "hush".into(),
            path_style: true,
            max_attempts: 3,
            part_size: MIN_PART_SIZE,
            ca_pem: None,
        }
    }

    #[test]
    fn the_secret_never_prints() {
        let s = settings();
        assert!(!format!("{s:?}").contains("hush"));
        assert!(!format!("{:?}", S3Client::new(&s).unwrap()).contains("hush"));
    }

    #[test]
    fn settings_are_checked_before_anything_is_sent() {
        for (endpoint, bucket, part) in
            [("ftp://x", "b", MIN_PART_SIZE), ("http://", "b", MIN_PART_SIZE), ("http://x", "a/b", MIN_PART_SIZE), ("http://x", "b", 1024)]
        {
            let s = S3Settings { endpoint: endpoint.into(), bucket: bucket.into(), part_size: part, ..settings() };
            assert!(S3Client::new(&s).is_err(), "accepted {endpoint} {bucket} {part}");
        }
        S3Client::new(&S3Settings { endpoint: String::new(), access_key_id: String::new(), ..settings() })
            .expect("AWS's own endpoint and the default credential chain");
    }
}
