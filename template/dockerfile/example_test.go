package dockerfile_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/cubicle-dev/cubicle/template/dockerfile"
)

// The client side of `cubicle template build -f Dockerfile -n name ctx`:
// translate the Dockerfile, then hash each COPY's files from the context
// as the e2b SDK would. The CLI then asks the server for each hash
// (GET /templates/{id}/files/{hash}), uploads Context.WriteTar where the
// server lacks it, and starts the build with r.Spec.
func Example() {
	ctx, _ := os.MkdirTemp("", "ctx")
	defer os.RemoveAll(ctx)
	os.WriteFile(filepath.Join(ctx, "app.py"), []byte("print('hi')\n"), 0o644)

	r, err := dockerfile.Parse([]byte(`FROM python:3.12
ARG PORT=8000
COPY app.py /srv/
CMD python /srv/app.py --port $PORT
`), dockerfile.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	c, _ := dockerfile.NewContext(ctx)
	if err := c.HashCopies(&r.Spec); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("from", r.Spec.FromImage)
	for _, st := range r.Spec.Steps {
		fmt.Println(st.Type, st.Args, len(st.FilesHash) == 64)
	}
	fmt.Printf("start %q, ready %q\n", r.Spec.StartCmd, r.Spec.ReadyCmd)
	// Output:
	// from python:3.12
	// USER [root] false
	// WORKDIR [/] false
	// ENV [PORT 8000] false
	// COPY [app.py /srv/  ] true
	// USER [user] false
	// WORKDIR [/home/user] false
	// start "python /srv/app.py --port $PORT", ready "sleep 20"
}
