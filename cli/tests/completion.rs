//! `dpoctl completion SHELL` prints a script the shell accepts, and bash's
//! completes the subcommands from it.

use std::process::Command;

fn script(shell: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dpoctl"))
        .args(["completion", shell])
        .output()
        .expect("dpoctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn bash_completes_subcommands_and_their_flags() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("dpoctl.bash");
    std::fs::write(&path, script("bash")).expect("write");
    // Ask the completion function what `dpoctl su<TAB>` and `dpoctl submit --w<TAB>` offer.
    let ask = |words: &str, cword: usize| -> String {
        let program = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE=\"{words}\"; COMP_POINT=${{#COMP_LINE}}; \
             _dpoctl dpoctl \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[@]}}\"",
            path.display()
        );
        let out = Command::new("bash")
            .args(["-c", &program])
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(ask("dpoctl su", 1), "submit");
    assert!(
        ask("dpoctl submit --w", 2)
            .split_whitespace()
            .any(|w| w == "--watch")
    );
    assert!(ask("dpoctl completion ", 2).contains("zsh"));
}

#[test]
fn zsh_fish_and_powershell_scripts_name_every_subcommand() {
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        let s = script(shell);
        for sub in [
            "local",
            "submit",
            "status",
            "watch",
            "list",
            "cancel",
            "workers",
            "completion",
        ] {
            assert!(s.contains(sub), "{shell}: no {sub}");
        }
    }
}
