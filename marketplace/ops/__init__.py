"""Operations pages for platform staff: the approval queue and the audit log."""
