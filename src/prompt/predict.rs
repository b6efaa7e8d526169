//! `Predict`: an LLM hyperfunction built from a signature.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::parse::parse_fields;
use super::signature::Signature;
use crate::error::Result;
use crate::function::{HyperFn, IoError, IoParams, Json};
use crate::llm::{note_request, note_response, ChatRequest, ChatResponse, LlmClient, LlmError};
use crate::observe::note_call;
use crate::param::LmParams;

/// When to ask the server for a JSON reply (`response_format: json_object`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JsonMode {
    /// Ask for JSON; if the server refuses the option (HTTP 400), stop asking and rely on the
    /// tolerant parser for the rest of the function's life.
    #[default]
    Auto,
    /// Always ask for JSON.
    Always,
    /// Never ask; parse whatever comes back.
    Never,
}

/// Builds a [`HyperFn`] that answers a [`Signature`] with one chat completion per candidate ×
/// example.
///
/// The system message is the instruction (the function's prompt, which prompt learning may
/// rewrite) followed by the fields and the reply format; the user message lists the inputs.
/// The reply is parsed into a JSON object with the output fields, converted to their types; a
/// reply that cannot be read fails the call with [`crate::Error::Parse`], which counts against
/// the candidate. θ is [`LmParams`] unless [`Predict::learn_params`] turns it off.
///
/// # Examples
/// ```no_run
/// use hyperfunc::llm::{LlmClient, LlmConfig};
/// use hyperfunc::prompt::{Predict, Signature};
/// let client = LlmClient::new(LlmConfig::from_env()?)?;
/// let sig = Signature::new("Answer from the context.")
///     .input("context", "facts").input("question", "the question")
///     .output("answer", "a few words");
/// let qa = Predict::new(sig, "gpt-4o-mini").learn_params(false).build("qa", &client)?;
/// assert!(qa.prompt_learnable());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Predict {
    signature: Signature,
    model: String,
    learn_prompt: bool,
    learn_params: bool,
    params: LmParams,
    json: JsonMode,
    cache: bool,
}

impl Predict {
    /// A predictor of `signature` on `model`: prompt and sampling knobs learnable, JSON replies
    /// when the server supports them, responses cached.
    pub fn new(signature: Signature, model: &str) -> Self {
        Self {
            signature,
            model: model.to_string(),
            learn_prompt: true,
            learn_params: true,
            params: LmParams::default(),
            json: JsonMode::Auto,
            cache: true,
        }
    }

    /// Whether prompt learning may rewrite the instruction (default true).
    pub fn learn_prompt(mut self, on: bool) -> Self {
        self.learn_prompt = on;
        self
    }

    /// Whether ES may tune the sampling knobs (default true); when off, [`Predict::params`]
    /// are used as they are.
    pub fn learn_params(mut self, on: bool) -> Self {
        self.learn_params = on;
        self
    }

    /// The sampling knobs to start from (or to use, when not learned).
    pub fn params(mut self, params: LmParams) -> Self {
        self.params = params;
        self
    }

    /// When to ask for JSON replies.
    pub fn json(mut self, mode: JsonMode) -> Self {
        self.json = mode;
        self
    }

    /// Whether identical requests are served from the client's cache (default true).
    pub fn cache(mut self, on: bool) -> Self {
        self.cache = on;
        self
    }

    /// The hyperfunction, named `name`, calling `client`.
    pub fn build(self, name: &str, client: &LlmClient) -> Result<HyperFn> {
        self.signature.validate()?;
        let model_max = client.model(&self.model).max_output_tokens;
        let spec = self.learn_params.then(|| self.params.spec_at());
        let instruction = self.signature.instruction().to_string();
        let sig = self.signature.clone();
        let learn_prompt = self.learn_prompt;
        let shared = Arc::new(Shared {
            cfg: self,
            client: client.clone(),
            label: Arc::from(name),
            model_max,
            json_state: AtomicU8::new(UNKNOWN),
            probe: tokio::sync::Mutex::new(()),
        });
        let f = HyperFn::io(name, spec, move |input: Json, params: IoParams| {
            let shared = shared.clone();
            async move { shared.call(input, params).await }
        })
        .prompt(instruction)
        .with_signature(sig)
        .retries(0)
        .concurrency(1024);
        Ok(if learn_prompt { f } else { f.freeze_prompt() })
    }
}

impl HyperFn {
    /// A [`Predict`] hyperfunction with the defaults (prompt and sampling knobs learnable).
    pub fn predict(
        name: &str,
        client: &LlmClient,
        model: &str,
        signature: Signature,
    ) -> Result<HyperFn> {
        Predict::new(signature, model).build(name, client)
    }
}

struct Shared {
    cfg: Predict,
    client: LlmClient,
    label: Arc<str>,
    model_max: u32,
    /// Whether the server takes `response_format` (JsonMode::Auto): UNKNOWN until the first
    /// answer, which one call finds out while the others wait.
    json_state: AtomicU8,
    probe: tokio::sync::Mutex<()>,
}

const UNKNOWN: u8 = 0;
const SUPPORTED: u8 = 1;
const REFUSED: u8 = 2;

impl Shared {
    /// Sends with `response_format: json_object` if the server takes it. The first call finds
    /// out (the others wait for its answer); a 400 to it means "refused" and the call is sent
    /// again without the option, as every later one is.
    async fn chat_auto(&self, mut req: ChatRequest) -> std::result::Result<ChatResponse, LlmError> {
        if self.json_state.load(Ordering::Acquire) == UNKNOWN {
            let _probe = self.probe.lock().await;
            if self.json_state.load(Ordering::Acquire) == UNKNOWN {
                req.json = true;
                let first = self.client.chat(req.clone()).await;
                match &first {
                    Err(LlmError::Http { status: 400, .. }) => {
                        self.json_state.store(REFUSED, Ordering::Release);
                        note_call("hyperfunc.json_mode_refused", true);
                        req.json = false;
                        return self.client.chat(req).await;
                    }
                    Ok(_) => self.json_state.store(SUPPORTED, Ordering::Release),
                    // A failure that says nothing about the option: the next call asks again.
                    Err(_) => {}
                }
                return first;
            }
        }
        req.json = self.json_state.load(Ordering::Acquire) == SUPPORTED;
        self.client.chat(req).await
    }

    async fn call(&self, input: Json, params: IoParams) -> std::result::Result<Json, IoError> {
        let (cfg, label) = (&self.cfg, &*self.label);
        let sig = &cfg.signature;
        let p = if cfg.learn_params {
            params
                .lm()
                .map_err(|e| IoError::fatal(format!("`{label}`: {e}")))?
        } else {
            cfg.params
        };
        let instruction = params.prompt().unwrap_or(sig.instruction());
        let user = sig
            .render_user(&input)
            .map_err(|e| IoError::fatal(format!("`{label}`: {e}")))?;
        let mut req = ChatRequest::new(&cfg.model)
            .label(label)
            .system(sig.render_system(instruction))
            .user(user)
            .lm(&p, self.model_max);
        req.no_cache = !cfg.cache;
        note_request(&self.client, &req);
        let resp = match cfg.json {
            JsonMode::Always | JsonMode::Never => {
                req.json = cfg.json == JsonMode::Always;
                self.client.chat(req).await
            }
            JsonMode::Auto => self.chat_auto(req).await,
        };
        match resp {
            Ok(resp) => {
                note_response(&resp);
                parse_fields(&resp.text, sig.outputs())
                    .map_err(|e| IoError::parse(format!("`{label}`: {e}"), resp.text))
            }
            Err(e) => {
                note_call("error.type", e.error_type());
                Err(if e.is_retryable() {
                    IoError::retryable(e.to_string())
                } else {
                    IoError::fatal(e.to_string())
                })
            }
        }
    }
}
