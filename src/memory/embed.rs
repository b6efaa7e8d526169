//! Text embeddings for semantic retrieval: the [`Embed`] trait, an OpenAI-compatible
//! `/v1/embeddings` client (feature `llm`), and the vector helpers the stores use.

use futures::future::BoxFuture;

use crate::error::Result;

/// Turns texts into vectors for [`Memory::with_embedder`](super::Memory::with_embedder).
///
/// Every vector of one embedder must have the same length; cosine similarity ignores their norm.
pub trait Embed: Send + Sync {
    /// One vector per text, in order.
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>>>;
}

/// f32 little-endian bytes, as stored.
pub(crate) fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The inverse of [`to_bytes`] (a trailing partial value is ignored).
pub(crate) fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Cosine similarity; 0 when either vector is zero or the lengths differ.
pub(crate) fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// An OpenAI-compatible embeddings endpoint (`POST {base_url}/embeddings`).
///
/// # Examples
/// ```no_run
/// use hyperfunc::memory::{Memory, OpenAiEmbedder};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let memory = Memory::open(":memory:").await?
///     .with_embedder(OpenAiEmbedder::new("http://127.0.0.1:4000/v1", "text-embedding-3-small")
///         .api_key("sk-…"));
/// # Ok::<(), hyperfunc::Error>(())
/// # }).unwrap();
/// ```
#[cfg(feature = "llm")]
#[derive(Clone, Debug)]
pub struct OpenAiEmbedder {
    url: String,
    model: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

#[cfg(feature = "llm")]
impl OpenAiEmbedder {
    /// Embeddings of `model` from the server at `base_url` (ending in `/v1`).
    pub fn new(base_url: &str, model: &str) -> Self {
        Self {
            url: format!("{}/embeddings", base_url.trim_end_matches('/')),
            model: model.into(),
            api_key: None,
            http: reqwest::Client::new(),
        }
    }

    /// Sends this bearer token.
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.into());
        self
    }

    async fn call(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        use crate::error::Error;
        let fail = |message: String, retryable: bool| Error::Io {
            function: "memory.embed".into(),
            message,
            retryable,
        };
        let body = serde_json::json!({"model": self.model, "input": texts});
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = &self.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| fail(format!("cannot reach {}: {e}", self.url), true))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| fail(format!("reading the answer of {}: {e}", self.url), true))?;
        if !status.is_success() {
            return Err(fail(
                format!(
                    "HTTP {status} from {}: {}",
                    self.url,
                    String::from_utf8_lossy(&bytes)
                ),
                status.as_u16() == 429 || status.is_server_error(),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Item {
            index: usize,
            embedding: Vec<f32>,
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            data: Vec<Item>,
        }
        let mut answer: Answer = serde_json::from_slice(&bytes)
            .map_err(|e| fail(format!("unreadable answer from {}: {e}", self.url), false))?;
        answer.data.sort_by_key(|i| i.index);
        Ok(answer.data.into_iter().map(|i| i.embedding).collect())
    }
}

#[cfg(feature = "llm")]
impl Embed for OpenAiEmbedder {
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>>> {
        Box::pin(self.call(texts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_and_cosine_is_scale_free() {
        let v = vec![1.0f32, -2.5, 3.25];
        assert_eq!(from_bytes(&to_bytes(&v)), v);
        let w: Vec<f32> = v.iter().map(|x| x * 4.0).collect();
        assert!((cosine(&v, &w) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&v, &[1.0, 2.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
    }
}
