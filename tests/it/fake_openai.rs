//! A scripted OpenAI-compatible server for the one test whose model must answer as a function
//! of the sampling knobs (no real server can): it speaks HTTP/1.1 and the chat completions JSON.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value as Json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A running fake; its base URL and how many requests it answered.
pub struct Fake {
    pub base_url: String,
    pub requests: Arc<AtomicUsize>,
}

/// Serves `answer(request_json) -> text` on 127.0.0.1 (a free port) until the runtime ends.
pub async fn serve(answer: impl Fn(&Json) -> String + Send + Sync + 'static) -> Fake {
    serve_status(move |req| Ok(answer(req))).await
}

/// Like [`serve`], but `answer` may refuse with `Err((status, message))`, sent as an OpenAI
/// error body.
pub async fn serve_status(
    answer: impl Fn(&Json) -> Result<String, (u16, String)> + Send + Sync + 'static,
) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (answer, count) = (answer.clone(), count.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut rd = BufReader::new(rd);
                loop {
                    // Request line and headers.
                    let mut len = 0usize;
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() && !first {
                            break;
                        }
                        first = false;
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    if rd.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let req: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
                    let (status, out) = match answer(&req) {
                        Ok(text) => (200, reply(&req, &text)),
                        Err((status, message)) => (
                            status,
                            json!({"error": {"message": message, "type": "invalid_request_error",
                                             "param": null, "code": null}})
                            .to_string(),
                        ),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{out}",
                        if status == 200 { "OK" } else { "Error" },
                        out.len()
                    );
                    if wr.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Fake {
        base_url: format!("http://{addr}/v1"),
        requests,
    }
}

/// Usage like a real server's: about a token per four characters of the messages and answer.
fn reply(req: &Json, text: &str) -> String {
    let chars: usize = req["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["content"].as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    let (prompt, completion) = (chars.div_ceil(4).max(1), text.len().div_ceil(4).max(1));
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": req["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion}
    })
    .to_string()
}
