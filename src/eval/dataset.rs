//! Datasets of JSON examples: a content hash, deterministic train/val/test splits that do not
//! move when examples are added, and filtering by tags. Versions live in a
//! [`RunStore`](crate::runs::RunStore) (`put_dataset`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::data::Examples;
use crate::error::{Error, Result};
use crate::function::Json;
use crate::util::fnv1a_hex;

/// One example: a stable id, its input, the expected answer, tags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Stable id (given, or the content hash of input and expected).
    #[serde(default)]
    pub id: String,
    /// The input.
    pub input: Json,
    /// The expected answer.
    pub expected: Json,
    /// Free tags (`math`, `hard`, `fr`…).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training examples.
    Train,
    /// Validation examples.
    Val,
    /// Held-out test examples.
    Test,
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "val" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(Error::config(
                "split",
                format!("`{other}`: one of train, val, test"),
            )),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        })
    }
}

/// A named list of [`Item`]s with unique ids.
///
/// # Examples
/// ```
/// use hyperfunc::eval::{Dataset, Split};
/// let ds = Dataset::from_jsonl("qa", r#"
/// {"input": "2+2?", "expected": "4", "tags": ["math"]}
/// {"input": "capital of France?", "expected": "Paris"}
/// {"id": "q3", "input": "3*3?", "expected": "9", "tags": ["math"]}
/// "#)?;
/// assert_eq!(ds.len(), 3);
/// assert_eq!(ds.with_tags(&["math"]).len(), 2);
/// // Splits are a function of (seed, id): adding examples never moves the others.
/// let test = ds.split(Split::Test, (0.6, 0.2, 0.2), 7);
/// let bigger = Dataset::new("qa", [ds.items().to_vec(), vec![hyperfunc::eval::Item {
///     id: "q4".into(), input: "1+1?".into(), expected: "2".into(), tags: vec![] }]].concat())?;
/// assert!(test.items().iter().all(|i| bigger.split(Split::Test, (0.6, 0.2, 0.2), 7).items().contains(i)));
/// assert_ne!(ds.hash(), bigger.hash());
/// # Ok::<(), hyperfunc::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    name: String,
    items: Vec<Item>,
}

impl Dataset {
    /// A dataset; items without an id get their content hash; ids must be unique.
    pub fn new(name: impl Into<String>, items: Vec<Item>) -> Result<Self> {
        let name = name.into();
        if name.trim().is_empty() {
            return Err(Error::config("dataset", "give the dataset a name"));
        }
        let mut seen = HashSet::new();
        let items: Vec<Item> = items
            .into_iter()
            .map(|mut it| {
                if it.id.is_empty() {
                    it.id = content_id(&it);
                }
                it
            })
            .collect();
        for it in &items {
            if !seen.insert(it.id.clone()) {
                return Err(Error::config(
                    "dataset",
                    format!(
                        "`{name}`: the id `{}` is used twice; ids must be unique",
                        it.id
                    ),
                ));
            }
        }
        Ok(Self { name, items })
    }

    /// Reads JSON Lines: one `{"input", "expected", "id"?, "tags"?}` per line (blank lines
    /// skipped); an error names the line.
    pub fn from_jsonl(name: impl Into<String>, text: &str) -> Result<Self> {
        let mut items = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let item: Item = serde_json::from_str(line).map_err(|e| {
                Error::config(
                    "dataset",
                    format!(
                        "line {}: {e}; expected {{\"input\": …, \"expected\": …}}",
                        i + 1
                    ),
                )
            })?;
            items.push(item);
        }
        Self::new(name, items)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its items, in order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it has no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A hash of the content (ids, inputs, expected answers, tags), independent of item order.
    pub fn hash(&self) -> String {
        let mut lines: Vec<String> = self
            .items
            .iter()
            .map(|i| serde_json::to_string(i).unwrap_or_default())
            .collect();
        lines.sort();
        fnv1a_hex(lines.join("\n").as_bytes())
    }

    /// The items of `split` for fractions `(train, val, test)` (normalised) and `seed`: each
    /// item's place depends only on the seed and its id.
    pub fn split(&self, split: Split, fractions: (f64, f64, f64), seed: u64) -> Dataset {
        let (a, b, c) = fractions;
        let total = (a + b + c).max(f64::MIN_POSITIVE);
        let (ta, tb) = (a / total, (a + b) / total);
        let items = self
            .items
            .iter()
            .filter(|it| {
                let h = fnv1a_hex(format!("{seed}\u{1f}{}", it.id).as_bytes());
                let u = mix(u64::from_str_radix(&h, 16).unwrap_or(0)) as f64 / u64::MAX as f64;
                let at = if u < ta {
                    Split::Train
                } else if u < tb {
                    Split::Val
                } else {
                    Split::Test
                };
                at == split
            })
            .cloned()
            .collect();
        Dataset {
            name: self.name.clone(),
            items,
        }
    }

    /// The items carrying every one of `tags`.
    pub fn with_tags(&self, tags: &[&str]) -> Dataset {
        self.filtered(|it| tags.iter().all(|t| it.tags.iter().any(|x| x == t)))
    }

    /// The items carrying none of `tags`.
    pub fn without_tags(&self, tags: &[&str]) -> Dataset {
        self.filtered(|it| !tags.iter().any(|t| it.tags.iter().any(|x| x == t)))
    }

    fn filtered(&self, keep: impl Fn(&Item) -> bool) -> Dataset {
        Dataset {
            name: self.name.clone(),
            items: self.items.iter().filter(|i| keep(i)).cloned().collect(),
        }
    }

    /// The items as [`Examples`] (JSON inputs and targets), in order.
    pub fn examples(&self) -> Result<Examples> {
        Examples::json(
            self.items.iter().map(|i| i.input.clone()).collect(),
            self.items.iter().map(|i| i.expected.clone()).collect(),
        )
    }
}

/// SplitMix64's finaliser: FNV's bits are not uniform enough for similar short ids.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn content_id(it: &Item) -> String {
    let text = format!("{}\u{1f}{}", it.input, it.expected);
    fnv1a_hex(text.as_bytes())
}
