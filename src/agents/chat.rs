//! CHAT: conversations, turn by turn, for all candidates at once, with an optional memory.

use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::try_join_all;
use serde::{Deserialize, Serialize};

use crate::data::Value;
use crate::error::{Error, Result};
use crate::memory::{Memory, Query, Scored};
use crate::metric::JsonMetric;
use crate::{Cx, Examples, HyperFn, HyperSystem, Json};

/// One CHAT example: the user's messages, in order.
///
/// # Examples
/// ```
/// use hyperfunc::agents::Conversation;
/// let c = Conversation::new(["hi", "what's my name?"]).max_turns(5).user("ada");
/// assert_eq!(c.turns(), 2);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// The user's messages; turn `t` sends message `t`.
    pub messages: Vec<String>,
    /// At most this many turns (all messages by default).
    #[serde(default)]
    pub max_turns: Option<usize>,
    /// Whose memories the conversation reads and writes (`"default"` when unset).
    #[serde(default)]
    pub user_id: Option<String>,
}

impl Conversation {
    /// A conversation of `messages`.
    pub fn new<I, M>(messages: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        Self {
            messages: messages.into_iter().map(Into::into).collect(),
            max_turns: None,
            user_id: None,
        }
    }

    /// Caps the number of turns.
    pub fn max_turns(mut self, n: usize) -> Self {
        self.max_turns = Some(n);
        self
    }

    /// Sets the user whose memories the conversation uses.
    pub fn user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Turns the conversation runs at most.
    pub fn turns(&self) -> usize {
        self.max_turns
            .map_or(self.messages.len(), |m| m.min(self.messages.len()))
    }

    fn user_id(&self) -> &str {
        self.user_id.as_deref().unwrap_or("default")
    }
}

impl Conversation {
    /// CHAT examples from conversations and their targets (whatever the metric compares with).
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::agents::Conversation;
    /// let ex = Conversation::examples(vec![
    ///     (Conversation::new(["I live in Oslo", "where do I live?"]), serde_json::json!("Oslo")),
    /// ])?;
    /// assert_eq!(ex.len(), 1);
    /// # Ok::<(), hyperfunc::Error>(())
    /// ```
    pub fn examples(items: Vec<(Conversation, Json)>) -> Result<Examples> {
        let (inputs, targets): (Vec<Json>, Vec<Json>) = items
            .into_iter()
            .map(|(c, t)| serde_json::to_value(c).map(|c| (c, t)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| chat_err(e.to_string()))?
            .into_iter()
            .unzip();
        Examples::json(inputs, targets)
    }
}

/// One exchange of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatTurn {
    /// What the user said.
    pub user: String,
    /// What the system answered.
    pub assistant: String,
}

/// What a chat system returns for one turn. A plain JSON string is a reply that does not end
/// the conversation; an object `{"reply": .., "done": .., "state": ..}` can end it and carry
/// state to the next turn (the system sees it as `state`).
///
/// # Examples
/// ```
/// use hyperfunc::agents::Reply;
/// let j = Reply::new("bye").done().to_json();
/// assert_eq!(j["done"], true);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The answer.
    pub reply: String,
    /// Whether the conversation is over.
    #[serde(default)]
    pub done: bool,
    /// State carried to the next turn and into [`ChatResult::state`].
    #[serde(default)]
    pub state: Json,
}

impl Reply {
    /// A reply that keeps the conversation going.
    pub fn new(reply: impl Into<String>) -> Self {
        Self {
            reply: reply.into(),
            ..Self::default()
        }
    }

    /// Ends the conversation after this reply.
    pub fn done(mut self) -> Self {
        self.done = true;
        self
    }

    /// Sets the carried state.
    pub fn state(mut self, state: Json) -> Self {
        self.state = state;
        self
    }

    /// As the JSON a chat system returns.
    pub fn to_json(&self) -> Json {
        serde_json::json!({ "reply": self.reply, "done": self.done, "state": self.state })
    }

    fn parse(j: &Json) -> Option<Reply> {
        match j {
            Json::String(s) => Some(Reply::new(s.clone())),
            Json::Object(o) => {
                let text = o
                    .get("reply")
                    .or_else(|| o.get("content"))
                    .and_then(Json::as_str)?;
                Some(Reply {
                    reply: text.to_string(),
                    done: o.get("done").and_then(Json::as_bool).unwrap_or(false),
                    state: o.get("state").cloned().unwrap_or(Json::Null),
                })
            }
            _ => None,
        }
    }
}

/// What the metric sees of one conversation of one candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatResult {
    /// Turns run.
    pub turns: usize,
    /// The exchanges, in order.
    pub messages: Vec<ChatTurn>,
    /// The system ended the conversation (`done`).
    pub done: bool,
    /// The turns ran out before the system said `done`.
    pub truncated: bool,
    /// A turn failed (its async call failed or returned something that is not a reply).
    pub failed: bool,
    /// The last state the system returned.
    pub state: Json,
}

impl ChatResult {
    /// The last reply, or `""`.
    pub fn last_reply(&self) -> &str {
        self.messages.last().map_or("", |t| t.assistant.as_str())
    }
}

/// How a [`Chat`] uses its memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChatMemory {
    /// Each candidate × conversation stores its turns under its own scratch user id (deleted
    /// when the conversation ends) and retrieves from the conversation's user plus that
    /// scratch: candidates never see each other's turns. The default, and right for
    /// optimisation.
    #[default]
    Isolated,
    /// Turns are stored under the conversation's user and kept: for serving one θ
    /// (a population of 1). A larger population is refused.
    Persistent,
}

/// A CHAT system: runs `system` turn by turn over each conversation.
///
/// Each turn the system gets, per candidate × conversation, the JSON
/// `{"message", "history": [{"user", "assistant"}..], "memory_context", "turn", "user_id",
/// "state"}` and returns a [`Reply`] (or a plain string). With a memory, the runner retrieves
/// context for each message (top [`Chat::context_limit`] entries) and stores each turn with
/// [`Memory::store_turn`].
pub struct Chat<S> {
    system: S,
    memory: Option<(Memory, ChatMemory)>,
    context_limit: usize,
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

impl<S: HyperSystem> Chat<S> {
    /// A chat runner around `system`, without memory.
    pub fn new(system: S) -> Self {
        Self {
            system,
            memory: None,
            context_limit: 5,
        }
    }

    /// Retrieves context from and stores turns in `memory` (isolated per conversation).
    pub fn memory(self, memory: Memory) -> Self {
        self.memory_mode(memory, ChatMemory::Isolated)
    }

    /// Uses `memory` in the given mode.
    pub fn memory_mode(mut self, memory: Memory, mode: ChatMemory) -> Self {
        self.memory = Some((memory, mode));
        self
    }

    /// Memories retrieved per message (default 5).
    pub fn context_limit(mut self, n: usize) -> Self {
        self.context_limit = n;
        self
    }

    /// The wrapped system.
    pub fn system(&self) -> &S {
        &self.system
    }

    /// Runs one conversation under `theta` (serving, not optimising) and returns its result.
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::agents::{Chat, Conversation, Reply};
    /// use hyperfunc::prelude::*;
    /// let echo = Chain::new(vec![HyperFn::io("echo", None, |x: Json, _| async move {
    ///     Ok(Reply::new(x["message"].as_str().unwrap_or("")).to_json())
    /// })]);
    /// let chat = Chat::new(echo);
    /// let theta = Theta::init(&chat, 0, &candle_core::Device::Cpu)?;
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let r = chat.converse(&theta, Conversation::new(["hi", "there"])).await?;
    /// assert_eq!(r.last_reply(), "there");
    /// # Ok::<(), hyperfunc::Error>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn converse(
        &self,
        theta: &crate::Theta,
        conversation: Conversation,
    ) -> Result<ChatResult> {
        let examples = Conversation::examples(vec![(conversation, Json::Null)])?;
        let out = super::outputs(self, theta, &examples).await?;
        let first = out
            .first()
            .ok_or_else(|| chat_err("the conversation produced no result"))?;
        ChatResult::deserialize(first).map_err(|e| chat_err(e.to_string()))
    }
}

struct Cell {
    user: String,
    scope: String,
    history: Vec<ChatTurn>,
    state: Json,
    done: bool,
    failed: bool,
}

impl<S: HyperSystem> Chat<S> {
    async fn context(&self, memory: &Memory, cell: &Cell, message: &str) -> Result<String> {
        let mut found: Vec<Scored> = memory
            .retrieve(
                &Query::new(message)
                    .user(&cell.user)
                    .limit(self.context_limit),
            )
            .await?;
        if cell.scope != cell.user {
            found.extend(
                memory
                    .retrieve(
                        &Query::new(message)
                            .user(&cell.scope)
                            .limit(self.context_limit),
                    )
                    .await?,
            );
            found.sort_by(|a, b| b.score.total_cmp(&a.score));
            found.truncate(self.context_limit);
        }
        Ok(Memory::format_context(&found))
    }
}

impl<S: HyperSystem> HyperSystem for Chat<S> {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        self.system.hyperfunctions()
    }

    async fn run(&self, cx: &Cx, input: Value) -> Result<Value> {
        let convs: Vec<Conversation> = input
            .as_json()
            .map_err(|_| chat_err("examples must be JSON conversations (see Conversation::examples)"))?
            .iter()
            .enumerate()
            .map(|(i, j)| {
                Conversation::deserialize(j).map_err(|e| {
                    chat_err(format!(
                        "example {} is not a conversation ({e}); build examples with Conversation::examples",
                        cx.first_example() + i
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let (pc, n) = (cx.population(), convs.len());
        if let Some((_, ChatMemory::Persistent)) = &self.memory {
            if pc > 1 {
                return Err(chat_err(format!(
                    "persistent memory serves one θ, but this evaluation has {pc} candidates: use Chat::memory (isolated) when optimising"
                )));
            }
        }
        let run = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let mut cells: Vec<Cell> = (0..pc * n)
            .map(|i| {
                let user = convs[i % n].user_id().to_string();
                let scope = match &self.memory {
                    Some((_, ChatMemory::Persistent)) | None => user.clone(),
                    Some((_, ChatMemory::Isolated)) => format!(
                        "{user}#scratch-{}-{run}-c{}-e{}",
                        std::process::id(),
                        cx.first_candidate() + i / n,
                        cx.first_example() + i % n
                    ),
                };
                Cell {
                    user,
                    scope,
                    history: Vec::new(),
                    state: Json::Null,
                    done: false,
                    failed: false,
                }
            })
            .collect();
        cx.mark_loop();
        let out = self.turns(cx, &convs, &mut cells).await;
        cx.set_active(None);
        // Scratch memories go whatever happened, so a failed evaluation leaves nothing behind.
        if let Some((memory, ChatMemory::Isolated)) = &self.memory {
            try_join_all(cells.iter().map(|c| memory.delete_user(&c.scope))).await?;
        }
        out?;
        let results = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let turns = c.history.len();
                serde_json::to_value(ChatResult {
                    turns,
                    done: c.done,
                    truncated: !c.done && !c.failed && turns >= convs[i % n].turns(),
                    failed: c.failed,
                    messages: c.history,
                    state: c.state,
                })
                .map_err(|e| chat_err(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Value::json_grid(results, true, None))
    }
}

impl<S: HyperSystem> Chat<S> {
    async fn turns(&self, cx: &Cx, convs: &[Conversation], cells: &mut [Cell]) -> Result<()> {
        let n = convs.len();
        let longest = convs.iter().map(Conversation::turns).max().unwrap_or(0);
        for t in 0..longest {
            let active: std::sync::Arc<[bool]> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| !c.done && !c.failed && t < convs[i % n].turns())
                .collect();
            if !active.iter().any(|&a| a) {
                break;
            }
            let contexts: Vec<String> = match &self.memory {
                Some((memory, _)) => {
                    try_join_all(cells.iter().zip(active.iter()).enumerate().map(
                        |(i, (c, &on))| async move {
                            if on {
                                self.context(memory, c, &convs[i % n].messages[t]).await
                            } else {
                                Ok(String::new())
                            }
                        },
                    ))
                    .await?
                }
                None => vec![String::new(); cells.len()],
            };
            let items: Vec<Json> = cells
                .iter()
                .zip(&contexts)
                .enumerate()
                .map(|(i, (c, ctx))| {
                    let conv = &convs[i % n];
                    serde_json::json!({
                        "message": conv.messages.get(t).cloned().unwrap_or_default(),
                        "history": c.history,
                        "memory_context": ctx,
                        "turn": t,
                        "user_id": c.user,
                        "state": c.state,
                    })
                })
                .collect();
            cx.set_active(Some(std::sync::Arc::clone(&active)));
            let out = self
                .system
                .run(cx, Value::json_grid(items, true, None))
                .await?;
            let replies = out.as_json().map_err(|_| {
                chat_err("the chat system must return JSON replies (a string or {\"reply\", \"done\", \"state\"})")
            })?;
            let per_cell = |i: usize| -> Option<&Json> {
                if out.is_batched() {
                    replies.get(i)
                } else {
                    replies.get(i % n)
                }
            };
            let mut stored = Vec::new();
            for (i, cell) in cells.iter_mut().enumerate() {
                if !active[i] {
                    continue;
                }
                match per_cell(i).and_then(Reply::parse) {
                    Some(r) => {
                        let user = convs[i % n].messages[t].clone();
                        cell.history.push(ChatTurn {
                            user: user.clone(),
                            assistant: r.reply.clone(),
                        });
                        cell.done = r.done;
                        cell.state = r.state;
                        stored.push((i, user, r.reply));
                    }
                    None => cell.failed = true,
                }
            }
            if let Some((memory, _)) = &self.memory {
                let cells = &*cells;
                try_join_all(
                    stored
                        .iter()
                        .map(|(i, user, reply)| memory.store_turn(user, reply, &cells[*i].scope)),
                )
                .await?;
            }
        }
        Ok(())
    }
}

fn chat_err(message: impl Into<String>) -> Error {
    Error::Agent {
        runner: "chat".into(),
        message: message.into(),
    }
}

/// A metric over each candidate's [`ChatResult`]s: `f(result, target)` averaged over
/// conversations. A failed conversation scores NaN (the candidate counts as failed).
///
/// # Examples
/// ```
/// let m = hyperfunc::agents::chat_metric(|r, target| {
///     f32::from(u8::from(r.last_reply().contains(target.as_str().unwrap_or(""))))
/// });
/// # let _ = m;
/// ```
pub fn chat_metric<G>(f: G) -> JsonMetric<impl Fn(&Json, &Json) -> f32 + Send + Sync>
where
    G: Fn(&ChatResult, &Json) -> f32 + Send + Sync,
{
    JsonMetric(
        move |pred: &Json, target: &Json| match ChatResult::deserialize(pred) {
            Ok(r) if !r.failed => f(&r, target),
            _ => f32::NAN,
        },
    )
}
