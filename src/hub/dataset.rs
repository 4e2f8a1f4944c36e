//! Hub datasets: `hf://datasets/owner/name[@revision][/config]` and a split (`data.split`,
//! `data.eval_split`) become local files in the Hugging Face cache's dataset layout
//! (`datasets--owner--name/{blobs, snapshots/<commit>/…, refs/<revision>}`), downloaded by the
//! same resuming, checksummed downloader as models ([`super::download`]).
//!
//! Which files are a split, in this order (the first rule that finds the split wins):
//! 1. The repo's own data files (`.parquet`, `.jsonl`, `.json`, and those gzip- or
//!    zstd-compressed), under `<config>/` when a config is named, grouped into splits as
//!    `datasets` groups them without a README `configs:` section (`datasets/data_files.py`):
//!    - shards named `[data/]<split>-NNNNN-of-NNNNN.*` give their split's name (any name:
//!      `train_sft` too);
//!    - else a directory named for the split's keyword (`train`/`training`,
//!      `validation`/`valid`/`dev`/`val`, `test`/`testing`/`eval`/`evaluation`; a custom split
//!      is its own keyword), whole or bounded by `-._ 0-9`;
//!    - else a file name holding the keyword so bounded;
//!    - else every file is the `train` split.
//! 2. The Hub's Parquet conversion (the `refs/convert/parquet` branch, which the Hub's
//!    dataset viewer writes for every public dataset): `<config>/<split>/NNNN.parquet` or
//!    `<config>/partial-<split>/NNNN.parquet`, the config `default` unless named (or the only one).
//!
//! A split already in the cache is read from it without the network (a sharded split only when
//! every `-of-` shard is there); `HF_HUB_OFFLINE=1` never goes online and names what is missing.
//! A `README` `configs:` section that maps splits to other paths is not read: such datasets are
//! read through their Parquet conversion, or name the files with a glob.

use super::HubEnv;
use super::download::{Client, Place, RepoKind, fetch_file, repo_dir_of, revision_info, write_ref};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The prefix of a Hub dataset in `data.train` / `data.eval`.
pub const PREFIX: &str = "hf://datasets/";

/// The branch the Hub's Parquet conversion lives on.
pub const CONVERT_BRANCH: &str = "refs/convert/parquet";

/// `hf://datasets/owner/name[@revision][/config]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    pub id: String,
    pub revision: String,
    pub config: Option<String>,
}

impl DatasetRef {
    /// `None` when `spec` does not start with `hf://datasets/`; an error when it does but is not
    /// `owner/name[@revision][/config]`. A revision with slashes is written percent-encoded
    /// (`@refs%2Fconvert%2Fparquet`), as `huggingface_hub`'s file system takes it.
    pub fn parse(spec: &str) -> Result<Option<Self>> {
        let Some(rest) = spec.strip_prefix(PREFIX) else {
            return Ok(None);
        };
        let bad = || {
            anyhow::anyhow!(
                "`{spec}`: a Hub dataset is hf://datasets/owner/name[@revision][/config]"
            )
        };
        let mut parts = rest.splitn(3, '/');
        let owner = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        let name_rev = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        let config = parts.next().map(|c| c.trim_end_matches('/').to_string());
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, r.replace("%2F", "/").replace("%2f", "/")),
            Some(_) => return Err(bad()),
            None => (name_rev, "main".to_string()),
        };
        let id = format!("{owner}/{name}");
        if super::ModelRef::parse(&id).is_none_or(|r| r.revision != "main") {
            return Err(bad());
        }
        if let Some(c) = &config
            && (c.is_empty() || crate::pathsafe::file_name(c).is_err() || c.starts_with('.'))
        {
            bail!("`{spec}`: `{c}` is not a config name");
        }
        Ok(Some(Self {
            id,
            revision,
            config,
        }))
    }
}

/// The extensions of the data files a split is made of: those the reader reads.
use crate::data::source::DATA_EXTENSIONS as EXTENSIONS;

/// The characters that bound a split keyword in a name (`datasets`' NON_WORDS_CHARS).
fn is_sep(c: char) -> bool {
    matches!(c, '-' | '.' | '_' | ' ') || c.is_ascii_digit()
}

/// The keywords that name `split` (`datasets`' SPLIT_KEYWORDS; another split is its own).
fn keywords(split: &str) -> Vec<&str> {
    match split {
        "train" => vec!["train", "training"],
        "validation" => vec!["validation", "valid", "dev", "val"],
        "test" => vec!["test", "testing", "eval", "evaluation"],
        s => vec![s],
    }
}

/// Whether `word` holds `keyword` whole or bounded by separators.
fn names(word: &str, keyword: &str, dir: bool) -> bool {
    if word == keyword && dir {
        return true;
    }
    let mut from = 0;
    while let Some(i) = word[from..].find(keyword).map(|i| i + from) {
        let before = word[..i].chars().next_back();
        let after = word[i + keyword.len()..].chars().next();
        let starts = before.is_none_or(is_sep);
        let ends = match after {
            Some(c) => is_sep(c),
            // A file name always goes on (its extension); a directory may end with the keyword.
            None => dir,
        };
        if starts && ends {
            return true;
        }
        from = i + 1;
    }
    false
}

/// `<split>-NNNNN-of-NNNNN.…` (optionally under `data/`): the split and the shard count.
fn sharded(path: &str) -> Option<(String, usize, usize)> {
    let name = path.strip_prefix("data/").unwrap_or(path);
    if name.contains('/') {
        return None;
    }
    let (split, rest) = name.split_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    let (i, rest) = rest.split_at_checked(5)?;
    let rest = rest.strip_prefix("-of-")?;
    let (n, ext) = rest.split_at_checked(5)?;
    if !(digits(i) && digits(n) && ext.starts_with('.') && !split.is_empty()) {
        return None;
    }
    Some((split.to_string(), i.parse().ok()?, n.parse().ok()?))
}

/// The splits of `files` (paths relative to the config's root) under the rules of the module
/// doc, as (split name, files), for messages; and the files of `split`.
fn own_split(files: &[&str], split: &str) -> (Vec<String>, Vec<String>) {
    let shards: Vec<(&str, (String, usize, usize))> = files
        .iter()
        .filter_map(|f| sharded(f).map(|s| (*f, s)))
        .collect();
    if !shards.is_empty() {
        let mut splits: Vec<String> = shards.iter().map(|(_, s)| s.0.clone()).collect();
        splits.sort();
        splits.dedup();
        let picked = shards
            .iter()
            .filter(|(_, s)| s.0 == split)
            .map(|(f, _)| f.to_string())
            .collect();
        return (splits, picked);
    }
    let known = ["train", "validation", "test"];
    let in_dir = |f: &str, s: &str| {
        let dirs: Vec<&str> = f.split('/').collect();
        dirs[..dirs.len() - 1]
            .iter()
            .any(|d| keywords(s).iter().any(|k| names(d, k, true)))
    };
    let in_name = |f: &str, s: &str| {
        let name = f.rsplit('/').next().unwrap_or(f);
        keywords(s).iter().any(|k| names(name, k, false))
    };
    let mut candidates: Vec<&str> = known.to_vec();
    if !known.contains(&split) {
        candidates.push(split);
    }
    for rule in [&in_dir as &dyn Fn(&str, &str) -> bool, &in_name] {
        let found: Vec<&str> = candidates
            .iter()
            .copied()
            .filter(|s| files.iter().any(|f| rule(f, s)))
            .collect();
        if !found.is_empty() {
            let picked = files
                .iter()
                .filter(|f| rule(f, split))
                .map(|f| f.to_string())
                .collect();
            return (found.iter().map(|s| s.to_string()).collect(), picked);
        }
    }
    let picked = if split == "train" {
        files.iter().map(|f| f.to_string()).collect()
    } else {
        Vec::new()
    };
    (vec!["train".into()], picked)
}

/// Why a repo listing gives no files for a split.
#[derive(Debug, PartialEq)]
enum Miss {
    /// No data files at all (under the config, when one is named).
    Data,
    /// Data, but not this split: the splits there are.
    Split(Vec<String>),
    /// No such config (or none named among several): the configs there are.
    Config(Vec<String>),
}

/// The data files of `config` / `split` among a repo's own `names` (rule 1).
fn select_own(names: &[&str], config: Option<&str>, split: &str) -> Result<Vec<String>, Miss> {
    let data: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| {
            EXTENSIONS.iter().any(|e| n.ends_with(e)) && !n.split('/').any(|c| c.starts_with('.'))
        })
        .collect();
    let (prefix, under): (String, Vec<&str>) = match config {
        Some(c) => {
            let p = format!("{c}/");
            (
                p.clone(),
                data.iter().filter_map(|n| n.strip_prefix(&p)).collect(),
            )
        }
        None => (String::new(), data.clone()),
    };
    if under.is_empty() {
        return Err(Miss::Data);
    }
    let (splits, picked) = own_split(&under, split);
    if picked.is_empty() {
        return Err(Miss::Split(splits));
    }
    let mut out: Vec<String> = picked.into_iter().map(|f| format!("{prefix}{f}")).collect();
    out.sort();
    Ok(out)
}

/// The Parquet conversion's files of `config` / `split` among `names` (rule 2).
fn select_converted(
    names: &[&str],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<String>, Miss> {
    let parquet: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.ends_with(".parquet") && n.matches('/').count() == 2)
        .collect();
    let mut configs: Vec<&str> = parquet.iter().filter_map(|n| n.split('/').next()).collect();
    configs.sort();
    configs.dedup();
    let config = match config {
        Some(c) if configs.contains(&c) => c,
        Some(_) => {
            return Err(Miss::Config(
                configs.iter().map(|s| s.to_string()).collect(),
            ));
        }
        None if configs.contains(&"default") => "default",
        None if configs.len() == 1 => configs[0],
        None if configs.is_empty() => return Err(Miss::Data),
        None => {
            return Err(Miss::Config(
                configs.iter().map(|s| s.to_string()).collect(),
            ));
        }
    };
    let mut splits = Vec::new();
    let mut out = Vec::new();
    for n in parquet {
        let mut p = n.split('/');
        let (c, s) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
        if c != config {
            continue;
        }
        let s = s.strip_prefix("partial-").unwrap_or(s);
        if s == split {
            out.push(n.to_string());
        }
        splits.push(s.to_string());
    }
    splits.sort();
    splits.dedup();
    if out.is_empty() {
        return Err(Miss::Split(splits));
    }
    out.sort();
    Ok(out)
}

/// Every file under `dir`, as paths relative to it with `/`.
fn listed(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.is_file()
                && let Ok(rel) = p.strip_prefix(root)
            {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Whether every shard `<split>-i-of-n` of `files` is among them (files not so named count as
/// whole: their number is not known offline).
fn shards_complete(files: &[String]) -> bool {
    files.iter().all(|f| {
        let Some((_, _, n)) = sharded(f.rsplit('/').next().unwrap_or(f)) else {
            return true;
        };
        (0..n).all(|i| {
            let want = format!("-{i:05}-of-{n:05}.");
            files.iter().any(|g| g.contains(&want))
        })
    })
}

fn describe(m: &Miss, what: &str, config: Option<&str>, split: &str) -> String {
    let config = config.map_or(String::new(), |c| format!(" of config `{c}`"));
    match m {
        Miss::Data => format!("{what} has no data files{config}"),
        Miss::Split(s) => format!(
            "{what} has no split `{split}`{config}; its splits: {}",
            s.join(", ")
        ),
        Miss::Config(c) => format!(
            "{what}: name a config (hf://datasets/owner/name/<config>); its configs: {}",
            c.join(", ")
        ),
    }
}

/// The files of `r`'s `split` in the cache (no network), when they are all there.
fn cached(repo: &Path, r: &DatasetRef, split: &str) -> Option<Vec<PathBuf>> {
    let config = r.config.as_deref();
    let mut tries: Vec<(String, bool)> = vec![(r.revision.clone(), false)];
    if r.revision == "main" {
        tries.push((CONVERT_BRANCH.to_string(), true));
    }
    for (rev, converted) in tries {
        let Some(snapshot) = super::snapshot_at(repo, &rev) else {
            continue;
        };
        let names = listed(&snapshot);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let picked = if converted {
            select_converted(&names, config, split)
        } else {
            select_own(&names, config, split)
        };
        if let Ok(files) = picked
            && shards_complete(&files)
        {
            return Some(files.iter().map(|f| snapshot.join(f)).collect());
        }
    }
    None
}

/// The local files of `split` of the dataset `r`: from the cache, else downloaded into it.
pub fn resolve(r: &DatasetRef, split: &str, env: &HubEnv) -> Result<Vec<PathBuf>> {
    let cache = env
        .cache
        .as_deref()
        .context("no Hugging Face cache directory: set HF_HUB_CACHE or HF_HOME")?;
    let id = r.id.as_str();
    let repo = repo_dir_of(cache, RepoKind::Dataset, id);
    if let Some(files) = cached(&repo, r, split) {
        return Ok(files);
    }
    let shown = format!(
        "{PREFIX}{id}{}{}",
        if r.revision == "main" {
            String::new()
        } else {
            format!("@{}", r.revision)
        },
        r.config
            .as_deref()
            .map_or(String::new(), |c| format!("/{c}"))
    );
    if env.offline {
        bail!(
            "{shown}: split `{split}` is not (all) in the Hugging Face cache ({}), and \
             HF_HUB_OFFLINE is set; run once online to download it",
            repo.display()
        );
    }
    let online = || -> Result<Vec<PathBuf>> {
        let client = Client::new(env);
        let config = r.config.as_deref();
        let info = revision_info(&client, RepoKind::Dataset, id, &r.revision)?;
        let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let (info, files, rev) = match select_own(&names, config, split) {
            Ok(files) => (info, files, r.revision.clone()),
            Err(Miss::Split(s)) => {
                bail!("{}", describe(&Miss::Split(s), &shown, config, split))
            }
            Err(own) => {
                // Not data files this reader knows (a loading script, CSV, a README-mapped
                // layout): the Hub's Parquet conversion of the same dataset.
                if r.revision != "main" {
                    bail!("{}", describe(&own, &shown, config, split));
                }
                let conv = revision_info(&client, RepoKind::Dataset, id, CONVERT_BRANCH)
                    .with_context(|| {
                        format!(
                            "{} (looking for its Parquet conversion, {CONVERT_BRANCH})",
                            describe(&own, &shown, config, split)
                        )
                    })?;
                let names: Vec<&str> = conv.siblings.iter().map(|s| s.rfilename.as_str()).collect();
                match select_converted(&names, config, split) {
                    Ok(files) => (conv, files, CONVERT_BRANCH.to_string()),
                    Err(m) => bail!(
                        "{} (in its Parquet conversion, {CONVERT_BRANCH})",
                        describe(&m, &shown, config, split)
                    ),
                }
            }
        };
        let commit = crate::pathsafe::file_name(&info.sha)
            .with_context(|| format!("{id}: the Hub's commit id for `{rev}`"))?;
        let snapshot = repo.join("snapshots").join(commit);
        let progress = super::progress::Progress::new();
        let at = Place {
            kind: RepoKind::Dataset,
            id,
            repo: &repo,
            snapshot: &snapshot,
            commit: &info.sha,
        };
        let mut paths = Vec::with_capacity(files.len());
        for f in &files {
            fetch_file(&client, &at, f, &progress)?;
            paths.push(
                crate::pathsafe::join_under(&snapshot, f)
                    .with_context(|| format!("{id}: a file of the repo"))?,
            );
        }
        write_ref(&repo, id, &rev, &info.sha)?;
        Ok(paths)
    };
    online()
        .with_context(|| {
            format!(
                "downloading {shown} (split `{split}`) from {} (set HF_HUB_OFFLINE=1 to stay offline)",
                env.endpoint
            )
        })
        .map_err(|e| env.redact_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let r = DatasetRef::parse("hf://datasets/o/n").unwrap().unwrap();
        assert_eq!(
            (r.id.as_str(), r.revision.as_str(), r.config),
            ("o/n", "main", None)
        );
        let r = DatasetRef::parse("hf://datasets/o/n@v1.0/en")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.revision.as_str(), r.config.as_deref()),
            ("v1.0", Some("en"))
        );
        let r = DatasetRef::parse("hf://datasets/o/n@refs%2Fconvert%2Fparquet")
            .unwrap()
            .unwrap();
        assert_eq!(r.revision, CONVERT_BRANCH);
        assert!(DatasetRef::parse("data/x.jsonl").unwrap().is_none());
        for bad in [
            "hf://datasets/o",
            "hf://datasets/o/n@",
            "hf://datasets/o/n/../x",
            "hf://datasets//n",
        ] {
            assert!(DatasetRef::parse(bad).is_err(), "{bad}");
        }
    }

    /// The layouts of `datasets`' own tests (tests/test_data_files.py) and of real repos.
    #[test]
    fn splits_are_found_as_datasets_finds_them() {
        let own =
            |names: &[&str], config: Option<&str>, split: &str| select_own(names, config, split);
        // push_to_hub's shards, custom split names too.
        let hub = [
            "README.md",
            "data/train_sft-00000-of-00002.parquet",
            "data/train_sft-00001-of-00002.parquet",
            "data/test_sft-00000-of-00001.parquet",
        ];
        assert_eq!(own(&hub, None, "train_sft").unwrap().len(), 2);
        assert_eq!(
            own(&hub, None, "train"),
            Err(Miss::Split(vec!["test_sft".into(), "train_sft".into()]))
        );
        // Split keywords in directory names, then in file names.
        let dirs = [
            "train/0.jsonl",
            "train/1.jsonl",
            "dev/a.jsonl",
            "test/b.jsonl",
        ];
        assert_eq!(own(&dirs, None, "validation").unwrap(), ["dev/a.jsonl"]);
        assert_eq!(own(&dirs, None, "train").unwrap().len(), 2);
        let files = [
            "my_train_file.jsonl",
            "my-test.json",
            "other.parquet",
            "trainer.jsonl",
        ];
        assert_eq!(own(&files, None, "train").unwrap(), ["my_train_file.jsonl"]);
        assert_eq!(own(&files, None, "test").unwrap(), ["my-test.json"]);
        // Nothing names a split: everything is train.
        let flat = ["a.jsonl", "b.parquet", "notes.txt"];
        assert_eq!(own(&flat, None, "train").unwrap(), ["a.jsonl", "b.parquet"]);
        assert_eq!(
            own(&flat, None, "test"),
            Err(Miss::Split(vec!["train".into()]))
        );
        // A config is a directory.
        let configs = [
            "en/train-00000-of-00001.parquet",
            "fr/train-00000-of-00001.parquet",
        ];
        assert_eq!(
            own(&configs, Some("fr"), "train").unwrap(),
            ["fr/train-00000-of-00001.parquet"]
        );
        assert_eq!(own(&configs, Some("de"), "train"), Err(Miss::Data));
        assert_eq!(own(&["script.py"], None, "train"), Err(Miss::Data));
        // The Parquet conversion.
        let conv = [
            "default/train/0000.parquet",
            "default/train/0001.parquet",
            "default/partial-test/0000.parquet",
            "other/train/0000.parquet",
        ];
        assert_eq!(select_converted(&conv, None, "train").unwrap().len(), 2);
        assert_eq!(select_converted(&conv, None, "test").unwrap().len(), 1);
        assert_eq!(
            select_converted(&conv, Some("other"), "train")
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            select_converted(&conv, Some("x"), "train"),
            Err(Miss::Config(vec!["default".into(), "other".into()]))
        );
    }

    #[test]
    fn a_sharded_split_counts_only_whole() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(shards_complete(&f(&[
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet"
        ])));
        assert!(!shards_complete(&f(&["data/train-00000-of-00002.parquet"])));
        assert!(shards_complete(&f(&["default/train/0000.parquet"])));
    }
}
