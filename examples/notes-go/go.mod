module tenement.example/notes-go

go 1.19
