//! One nats-server user per agent, allowed its own server's subjects and
//! nothing else: the block of `nats/users.conf` between [`BEGIN`] and
//! [`END`]. `headroom nats-users` writes it, and the test fixture writes
//! its own from the same function, so the permissions the stack runs with
//! are the ones the tests check.
//!
//! With one user shared by every agent, any agent could report another
//! server idle (and have it released), keep a dead one alive, or report a
//! healthy member failed. Per-user permissions in the server's static
//! configuration bind each agent to its server without the operator/JWT
//! mode: the server refuses a publication outside them, and logs it.

use crate::ids::ServerId;
use crate::kv::SERVERS_BUCKET;

/// The line before the generated users.
pub const BEGIN: &str = "    # BEGIN agent users: written by `headroom nats-users`, do not edit";
/// The line after them.
pub const END: &str = "    # END agent users";

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("the configuration has no `{BEGIN}` line followed by an `{END}` line")]
    NoMarkers,
    #[error("servers {0} and {1} would read their passwords from the same variable {2}")]
    SameVariable(ServerId, ServerId, String),
}

/// The user name of `server`'s agent.
pub fn user(server: &ServerId) -> String {
    format!("agent-{server}")
}

/// The environment variable nats-server reads that user's password from.
pub fn password_variable(server: &ServerId) -> String {
    let name = server.as_str().to_ascii_uppercase().replace('-', "_");
    format!("HEADROOM_AGENT_{name}_PASSWORD")
}

/// The inbox prefix of that agent's connection: replies to it (JetStream's
/// and the allocator's) come under a prefix of its own, so it needs no
/// permission to read anyone else's.
pub fn inbox_prefix(server: &ServerId) -> String {
    format!("_INBOX.agent-{server}")
}

/// The users of `servers`' agents, as entries of `authorization.users`.
///
/// # Errors
/// [`UsersError::SameVariable`] when two ids differ only by `-` and `_`
/// or by case.
pub fn block(servers: &[ServerId]) -> Result<String, UsersError> {
    let mut seen = std::collections::HashMap::new();
    let mut out = String::new();
    for server in servers {
        let variable = password_variable(server);
        if let Some(other) = seen.insert(variable.clone(), server) {
            if other != server {
                return Err(UsersError::SameVariable(
                    other.clone(),
                    server.clone(),
                    variable,
                ));
            }
            continue;
        }
        let stream = format!("KV_{SERVERS_BUCKET}");
        out.push_str(&format!(
            "    # {server}'s agent: its reports and statuses, its registration, a watch of its own\n\
             \x20   # record (the filter is in the subject), its assignment notices, its own inbox.\n\
             \x20   {{ user: {user}, password: ${variable}, permissions: {{\n\
             \x20       publish: [\n\
             \x20         \"headroom.metrics.*.{server}\", \"headroom.status.{server}\",\n\
             \x20         \"headroom.admin.pool.register.{server}\",\n\
             \x20         \"$JS.API.INFO\", \"$JS.API.STREAM.INFO.{stream}\",\n\
             \x20         \"$JS.API.CONSUMER.CREATE.{stream}.*.$KV.{SERVERS_BUCKET}.{server}\",\n\
             \x20         \"$JS.API.CONSUMER.DELETE.{stream}.*\", \"$JS.FC.>\"\n\
             \x20       ]\n\
             \x20       subscribe: [\"headroom.assign.{server}\", \"{inbox}.>\"]\n\
             \x20   }} }}\n",
            user = user(server),
            inbox = inbox_prefix(server),
        ));
    }
    Ok(out)
}

/// `conf` with the block between its markers replaced by `servers`' users.
///
/// # Errors
/// [`UsersError::NoMarkers`] when `conf` has no block to replace, and as
/// [`block`].
pub fn rewrite(conf: &str, servers: &[ServerId]) -> Result<String, UsersError> {
    let start = conf.find(BEGIN).ok_or(UsersError::NoMarkers)?;
    let after_begin = start + BEGIN.len();
    let end = conf[after_begin..]
        .find(END)
        .map(|at| after_begin + at)
        .ok_or(UsersError::NoMarkers)?;
    Ok(format!(
        "{}\n{}{}",
        &conf[..after_begin],
        block(servers)?,
        &conf[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<ServerId> {
        names
            .iter()
            .map(|n| ServerId::new(*n).expect("id"))
            .collect()
    }

    #[test]
    fn each_agent_gets_its_own_subjects_only() {
        let text = block(&ids(&["web-1"])).expect("block");
        assert!(text.contains("user: agent-web-1, password: $HEADROOM_AGENT_WEB_1_PASSWORD"));
        for subject in [
            "\"headroom.metrics.*.web-1\"",
            "\"headroom.status.web-1\"",
            "\"headroom.admin.pool.register.web-1\"",
            "\"$JS.API.CONSUMER.CREATE.KV_headroom-servers.*.$KV.headroom-servers.web-1\"",
            "\"headroom.assign.web-1\"",
            "\"_INBOX.agent-web-1.>\"",
        ] {
            assert!(text.contains(subject), "{subject} in\n{text}");
        }
        assert!(!text.contains("headroom.metrics.*.*"), "{text}");
        assert!(!text.contains("\"_INBOX.>\""), "{text}");
    }

    #[test]
    fn the_block_between_the_markers_is_replaced_and_nothing_else() {
        let conf = format!("before\n{BEGIN}\nold\n{END}\nafter\n");
        let new = rewrite(&conf, &ids(&["a", "b"])).expect("rewrite");
        assert!(new.starts_with(&format!("before\n{BEGIN}\n")));
        assert!(new.ends_with(&format!("{END}\nafter\n")));
        assert!(!new.contains("old"));
        assert!(new.contains("agent-a") && new.contains("agent-b"));
        assert_eq!(rewrite(&new, &ids(&["a", "b"])).expect("again"), new);
        assert!(matches!(
            rewrite("no markers", &ids(&["a"])),
            Err(UsersError::NoMarkers)
        ));
    }

    #[test]
    fn the_stacks_users_are_what_the_command_writes() {
        let conf = include_str!("../../nats/users.conf");
        let servers = ids(&["backend-1", "backend-2", "backend-3", "backend-4"]);
        assert_eq!(
            rewrite(conf, &servers).expect("rewrite"),
            conf,
            "nats/users.conf is stale: run `headroom nats-users backend-1 backend-2 backend-3 backend-4`"
        );
    }

    #[test]
    fn ids_that_would_share_a_password_variable_are_refused() {
        assert!(matches!(
            block(&ids(&["web-1", "web_1"])),
            Err(UsersError::SameVariable(..))
        ));
    }
}
