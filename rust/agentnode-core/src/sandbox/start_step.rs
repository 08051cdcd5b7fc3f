//! The steps of a task's start in the child, and the 8-byte records (step, errno) it writes to
//! the error pipe: a failed step, or one of the few records that are not failures.

use std::fmt;

use super::plan::Op;

/// Where the child's start stands, as it reports it on the error pipe.
///
/// Each step has a fixed code on the pipe (see [`StartStep::code`]); the filesystem plan's
/// steps are their indices, the others lie above any plan's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartStep {
    /// The filesystem plan's operation at this index.
    Plan(u32),
    Sync,
    Netns,
    Hostname,
    Cwd,
    Rlimit,
    Stdio,
    Ids,
    Caps,
    Nnp,
    Seccomp,
    Exec,
    Loopback,
    Cgroup,
    /// Not a failure: the record a child that starts from the template writes once it is in
    /// its own copy (errno 0), so the parent can hold that namespace.
    MountsReady,
    /// Not a failure: a zygote is ready for a task.
    ZygoteReady,
    /// Not a failure: a zygote has taken a task and holds copies of the descriptors it names.
    ZygoteGo,
    Files,
    VerifyIds,
    Landlock,
}

/// The first code above the filesystem plan's indices.
const NAMED: u32 = 10_000;

/// The named steps in code order: `NAMED + i` is the code of `BY_CODE[i]`.
const BY_CODE: [StartStep; 19] = [
    StartStep::Sync,
    StartStep::Netns,
    StartStep::Hostname,
    StartStep::Cwd,
    StartStep::Rlimit,
    StartStep::Stdio,
    StartStep::Ids,
    StartStep::Caps,
    StartStep::Nnp,
    StartStep::Seccomp,
    StartStep::Exec,
    StartStep::Loopback,
    StartStep::Cgroup,
    StartStep::MountsReady,
    StartStep::ZygoteReady,
    StartStep::ZygoteGo,
    StartStep::Files,
    StartStep::VerifyIds,
    StartStep::Landlock,
];

impl StartStep {
    /// The step's code on the error pipe. A plain match, as the child may not allocate.
    #[must_use]
    pub const fn code(self) -> u32 {
        NAMED
            + match self {
                Self::Plan(i) => return i,
                Self::Sync => 0,
                Self::Netns => 1,
                Self::Hostname => 2,
                Self::Cwd => 3,
                Self::Rlimit => 4,
                Self::Stdio => 5,
                Self::Ids => 6,
                Self::Caps => 7,
                Self::Nnp => 8,
                Self::Seccomp => 9,
                Self::Exec => 10,
                Self::Loopback => 11,
                Self::Cgroup => 12,
                Self::MountsReady => 13,
                Self::ZygoteReady => 14,
                Self::ZygoteGo => 15,
                Self::Files => 16,
                Self::VerifyIds => 17,
                Self::Landlock => 18,
            }
    }

    /// The step a code names; a code no named step has is a plan step's index.
    #[must_use]
    pub fn from_code(code: u32) -> Self {
        code.checked_sub(NAMED)
            .and_then(|i| BY_CODE.get(i as usize).copied())
            .unwrap_or(Self::Plan(code))
    }

    /// The 8-byte record of this step failing with `errno` (0 for the records that are not
    /// failures).
    #[must_use]
    pub const fn record(self, errno: i32) -> [u8; 8] {
        let (step, errno) = (self.code().to_ne_bytes(), errno.to_ne_bytes());
        [
            step[0], step[1], step[2], step[3], errno[0], errno[1], errno[2], errno[3],
        ]
    }

    /// The step and errno of a record; `None` if it is shorter than one.
    #[must_use]
    pub fn parse(record: &[u8]) -> Option<(Self, i32)> {
        let step = u32::from_ne_bytes(record.get(..4)?.try_into().ok()?);
        let errno = i32::from_ne_bytes(record.get(4..8)?.try_into().ok()?);
        Some((Self::from_code(step), errno))
    }

    /// What the step does, for the one-line error, with a plan step named by its operation
    /// in `ops`.
    #[must_use]
    pub fn describe(self, ops: &[Op]) -> String {
        match self {
            Self::Plan(i) => ops
                .get(i as usize)
                .map_or_else(|| self.to_string(), Op::describe),
            named => named.to_string(),
        }
    }
}

impl fmt::Display for StartStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Self::Plan(i) => return write!(f, "step {i}"),
            Self::Sync => "wait for the parent",
            Self::Netns => "join the network namespace",
            Self::Hostname => "set the hostname",
            Self::Cwd => "enter the working directory",
            Self::Rlimit => "set rlimits",
            Self::Stdio => "set up stdio",
            Self::Ids => "switch to the task's uid/gid",
            Self::VerifyIds => {
                "confirm the task's real, effective and saved uid/gid and empty groups"
            }
            Self::Landlock => "restrict the task with its Landlock ruleset",
            Self::Caps => "drop capabilities",
            Self::Nnp => "set no_new_privs",
            Self::Seccomp => "install the seccomp filter",
            Self::Exec => "execute the task's program",
            Self::Loopback => "bring up the loopback interface",
            Self::Cgroup => "join the task's v1 cgroups",
            Self::Files => "copy the descriptor table",
            Self::MountsReady => "enter its copy of the template",
            Self::ZygoteReady => "make the zygote ready",
            Self::ZygoteGo => "hand the task to the zygote",
        };
        f.write_str(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_plan_steps_keep_their_index() {
        for step in BY_CODE {
            assert_eq!(StartStep::from_code(step.code()), step);
            let record = step.record(13);
            assert_eq!(StartStep::parse(&record), Some((step, 13)));
        }
        assert_eq!(StartStep::from_code(3), StartStep::Plan(3));
        assert_eq!(
            StartStep::from_code(NAMED + 99),
            StartStep::Plan(NAMED + 99)
        );
        assert_eq!(StartStep::parse(&[0; 7]), None);
        assert_eq!(StartStep::Plan(7).describe(&[]), "step 7");
        assert_eq!(StartStep::Caps.describe(&[]), "drop capabilities");
    }
}
