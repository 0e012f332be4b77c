package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/template"
)

func templateCmd() *cobra.Command {
	var dataDir, cacheDir string
	cmd := &cobra.Command{Use: "template", Short: "Build, list and remove templates"}
	dataDirFlag(cmd.PersistentFlags(), &dataDir)
	cmd.PersistentFlags().StringVar(&cacheDir, "cache-dir", template.DefaultCacheDir(), "cache for slow artifacts (env CUBICLE_CACHE_DIR)")

	var force bool
	buildBase := &cobra.Command{
		Use:   "build-base",
		Short: "Build the default template \"base\" (Debian bookworm; cached by its inputs)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if os.Geteuid() != 0 {
				return errors.New("building a template needs root (debootstrap, chroot)")
			}
			t, err := template.BuildBase(cmd.Context(), template.BuildOptions{
				DataDir: dataDir, CacheDir: cacheDir, Progress: cmd.ErrOrStderr(), Force: force,
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "template %s ready (build %s)\n", t.TemplateID, t.BuildID)
			return nil
		},
	}
	buildBase.Flags().BoolVar(&force, "force", false, "rebuild from the mirror even when the cache has it")
	cmd.AddCommand(templateBuildCmd(), templateListCmd(&dataDir), templateRmCmd(), templateLogsCmd(), buildBase)
	cmd.AddCommand(buildCodeInterpreterCmd(&dataDir, &cacheDir))
	return cmd
}

// listLocalTemplates lists the registry in dataDir, without a server.
func listLocalTemplates(out io.Writer, dataDir string) error {
	reg, err := template.Open(dataDir)
	if err != nil {
		return err
	}
	ts, err := reg.List()
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tALIASES\tCPU\tMEMORY MB\tDISK MB\tBUILD\tCREATED")
	for _, t := range ts {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%s\n", t.TemplateID, strings.Join(t.Aliases, ","),
			t.CPUCount, t.MemoryMB, t.DiskSizeMB, t.BuildID, t.CreatedAt.Local().Format("2006-01-02 15:04"))
	}
	return tw.Flush()
}

// templateSource resolves templates for the orchestrator from the registry.
type templateSource struct {
	reg *template.Registry
}

func (s templateSource) Lookup(idOrAlias string) (orchestrator.Template, error) {
	t, err := s.reg.Get(idOrAlias)
	if err != nil {
		return orchestrator.Template{}, err
	}
	rootfs := s.reg.RootFS(t)
	if rootfs == "" {
		return orchestrator.Template{}, fmt.Errorf("template %q has no root filesystem", idOrAlias)
	}
	alias := ""
	if len(t.Aliases) > 0 {
		alias = t.Aliases[0]
	}
	return orchestrator.Template{
		ID: t.TemplateID, Alias: alias, RootFS: rootfs,
		CPUCount: t.CPUCount, MemoryMB: t.MemoryMB, DiskSizeMB: t.DiskSizeMB,
		StartCmd: t.StartCmd, ReadyCmd: t.ReadyCmd,
		Env: t.Env, User: t.User, Workdir: t.Workdir, Owner: t.Owner, Public: t.Public,
	}, nil
}

// ensureBaseTemplate opens the registry and builds "base" when it is
// missing, with progress on stderr.
func ensureBaseTemplate(ctx context.Context, c serveConfig) (templateSource, error) {
	reg, err := template.Open(c.dataDir)
	if err != nil {
		return templateSource{}, err
	}
	_, err = reg.Get(template.BaseID)
	switch {
	case err == nil:
	case !errors.Is(err, template.ErrNotFound):
		return templateSource{}, err
	case c.noBuild:
		return templateSource{}, fmt.Errorf("template %q is missing and --no-build is set: run `cubicle template build-base`", template.BaseID)
	default:
		fmt.Fprintln(os.Stderr, "building the default template \"base\" (first start; later starts reuse the cache)")
		if _, err := template.BuildBase(ctx, template.BuildOptions{DataDir: c.dataDir, CacheDir: c.cacheDir, Progress: os.Stderr}); err != nil {
			return templateSource{}, fmt.Errorf("building template base: %w", err)
		}
	}
	return templateSource{reg: reg}, nil
}
