//! The Lua scripts, each with the shared helpers prepended. `redis::Script` sends the hash
//! first and the body only when the server does not know it (after a restart, say).

use std::sync::LazyLock;

use redis::Script;

const COMMON: &str = include_str!("../lua/common.lua");

fn with_common(body: &str) -> Script {
    Script::new(&format!("{COMMON}\n{body}"))
}

pub static ENQUEUE: LazyLock<Script> =
    LazyLock::new(|| with_common(include_str!("../lua/enqueue.lua")));
pub static CYCLE: LazyLock<Script> =
    LazyLock::new(|| with_common(include_str!("../lua/cycle.lua")));
pub static RENEW: LazyLock<Script> =
    LazyLock::new(|| with_common(include_str!("../lua/renew.lua")));
pub static RELEASE: LazyLock<Script> =
    LazyLock::new(|| with_common(include_str!("../lua/release.lua")));
pub static DEAD: LazyLock<Script> = LazyLock::new(|| with_common(include_str!("../lua/dead.lua")));
