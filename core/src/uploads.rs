//! A job's uploads: written into its work dir before it starts, never through a symlink (which
//! could point anywhere on the host).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::CoreError;
use crate::spec::Upload;

/// Refuses uploads that would be written through a symlink in the work dir (which could
/// point anywhere on the host).
pub fn refuse_symlinks(work_dir: &Path, uploads: &[Upload]) -> Result<(), CoreError> {
    for upload in uploads {
        let mut checked = work_dir.to_path_buf();
        for component in upload.path.components() {
            checked.push(component);
            if std::fs::symlink_metadata(&checked).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(CoreError::InvalidArgument {
                    field: "uploads",
                    message: format!("{} goes through a symlink", upload.path.display()),
                });
            }
        }
    }
    Ok(())
}

pub fn write_uploads(work_dir: &Path, uploads: &[Upload]) -> Result<(), CoreError> {
    // Checked again here: the work dir may have changed since the request was accepted.
    refuse_symlinks(work_dir, uploads)?;
    for upload in uploads {
        let target = work_dir.join(&upload.path);
        let io = |e: std::io::Error| {
            CoreError::Internal(format!("upload {}: {e}", upload.path.display()))
        };
        if upload.is_directory {
            std::fs::create_dir_all(&target).map_err(io)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&target, &upload.content).map_err(io)?;
        let mode = if upload.mode == 0 { 0o644 } else { upload.mode };
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}
