//! vitals' own questions to a Confluent-compatible registry (vitals', Confluent's, …) beyond
//! what the codec asks: is vitals' schema registered under a subject, and is it the latest
//! version there? Used by the edge's `/readyz` and by `vitals schemas register|check`. Sends the
//! configured basic credential like every other vitals client of the registry.

use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::json;

/// A version of a subject: its number and its global schema id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct Registered {
    pub version: i32,
    pub id: i32,
}

/// Where vitals' schema stands under a subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectState {
    /// vitals' schema is the latest version.
    Current(Registered),
    /// vitals' schema is not registered (live) under the subject; `latest` is what is.
    Absent { latest: Option<Registered> },
    /// vitals' schema is an older version; a different schema was registered after it.
    Superseded { ours: Registered, latest: Registered },
}

impl SubjectState {
    /// What is wrong, in one line naming the subject, the latest version and id and where
    /// vitals' schema (`name`) is; `None` when vitals' schema is the latest.
    pub fn problem(&self, subject: &str, name: &str) -> Option<String> {
        match self {
            SubjectState::Current(_) => None,
            SubjectState::Absent { latest: None } => {
                Some(format!("{subject}: vitals' schema `{name}` is absent (the subject has no live version)"))
            }
            SubjectState::Absent { latest: Some(l) } => Some(format!(
                "{subject}: the latest version {} (id {}) is not vitals' schema `{name}`, which is absent from the subject",
                l.version, l.id
            )),
            SubjectState::Superseded { ours, latest } => Some(format!(
                "{subject}: the latest version {} (id {}) is not vitals' schema `{name}`, which is version {} (id {})",
                latest.version, latest.id, ours.version, ours.id
            )),
        }
    }
}

/// A registry client with an optional basic credential.
#[derive(Clone)]
pub struct RegistryClient {
    base: Url,
    http: reqwest::Client,
    auth: Option<(String, String)>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

impl RegistryClient {
    /// `user` empty: no `Authorization` header (a registry without authentication).
    pub fn new(url: &str, user: &str, password: &str) -> anyhow::Result<RegistryClient> {
        RegistryClient::with_roots(url, user, password, &[])
    }

    /// The same, trusting `roots` (beside the system's CAs) for an https registry.
    pub fn with_roots(url: &str, user: &str, password: &str, roots: &[reqwest::Certificate]) -> anyhow::Result<RegistryClient> {
        let base = Url::parse(url.trim_end_matches('/')).with_context(|| format!("registry.url {url:?} is not a URL"))?;
        let builder =
            roots.iter().fold(reqwest::Client::builder().timeout(Duration::from_secs(5)), |b, r| b.add_root_certificate(r.clone()));
        let http = builder.build().context("building the registry HTTP client")?;
        let auth = (!user.is_empty()).then(|| (user.to_owned(), password.to_owned()));
        Ok(RegistryClient { base, http, auth })
    }

    fn url(&self, segments: &[&str]) -> anyhow::Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("registry.url {} cannot have a path", self.base))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// Sends a request; `Ok(None)` for a 404 whose error_code is one of `absent`, the parsed
    /// body for a 2xx, an error naming the request and the registry's answer otherwise.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<serde_json::Value>,
        absent: &[i64],
    ) -> anyhow::Result<Option<T>> {
        let url = self.url(segments)?;
        let what = format!("{method} {}", url.path());
        let mut request = self.http.request(method, url);
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/vnd.schemaregistry.v1+json").body(body.to_string());
        }
        let response = request.send().await.with_context(|| format!("schema registry unreachable ({what})"))?;
        let status = response.status();
        let text = response.text().await.with_context(|| format!("reading the registry's answer to {what}"))?;
        if status.is_success() {
            return serde_json::from_str(&text).map(Some).with_context(|| format!("unexpected answer to {what}: {text}"));
        }
        let error: Option<ErrorBody> = serde_json::from_str(&text).ok();
        let code = error.as_ref().and_then(|e| e.error_code);
        if status == StatusCode::NOT_FOUND && code.is_some_and(|c| absent.contains(&c)) {
            return Ok(None);
        }
        let message = error.and_then(|e| e.message).unwrap_or(text);
        let hint = match status {
            StatusCode::UNAUTHORIZED => " (check registry.reader_user / reader_password, or admin_* for writes)",
            StatusCode::FORBIDDEN => " (this credential may not do that: writes need registry.admin_user)",
            _ => "",
        };
        bail!("the schema registry answered {status} to {what}: {message}{hint}")
    }

    /// The version and id under which `subject` holds `schema` (a lookup by content), if live.
    pub async fn lookup(&self, subject: &str, schema: &str) -> anyhow::Result<Option<Registered>> {
        // 40401 subject not found, 40403 schema not found in the subject.
        self.call(Method::POST, &["subjects", subject], Some(json!({ "schema": schema })), &[40401, 40403]).await
    }

    /// The latest live version of `subject`, if it has one.
    pub async fn latest(&self, subject: &str) -> anyhow::Result<Option<Registered>> {
        // 40401 subject not found, 40402 version not found.
        self.call(Method::GET, &["subjects", subject, "versions", "latest"], None, &[40401, 40402]).await
    }

    /// Registers `schema` under `subject` (the existing id if it is live there already).
    pub async fn register(&self, subject: &str, schema: &str) -> anyhow::Result<i32> {
        #[derive(Deserialize)]
        struct Id {
            id: i32,
        }
        let id: Option<Id> = self.call(Method::POST, &["subjects", subject, "versions"], Some(json!({ "schema": schema })), &[]).await?;
        id.map(|i| i.id).context("the registry answered no id")
    }

    /// Where `schema` stands under `subject`.
    pub async fn state(&self, subject: &str, schema: &str) -> anyhow::Result<SubjectState> {
        let (ours, latest) = tokio::try_join!(self.lookup(subject, schema), self.latest(subject))?;
        Ok(match (ours, latest) {
            (Some(ours), Some(latest)) if ours.version != latest.version => SubjectState::Superseded { ours, latest },
            (Some(ours), _) => SubjectState::Current(ours),
            (None, latest) => SubjectState::Absent { latest },
        })
    }
}
